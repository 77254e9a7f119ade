using System.Diagnostics;

namespace LiveMig.Tests;

/// <summary>
/// Reads a child process's output with a bound: a child that hangs is killed and the test
/// fails saying so, instead of the test run waiting for ever on a pipe.
/// </summary>
internal static class ChildOutput
{
    public static readonly TimeSpan Bound = TimeSpan.FromSeconds(120);

    /// <summary>Everything the child writes on <paramref name="stream"/> until it closes it (exits).</summary>
    public static string All(Process child, StreamReader stream) => Within(child, stream.ReadToEndAsync(), "finish");

    /// <summary>The child's next line on <paramref name="stream"/>; null when it closed the stream.</summary>
    public static string? Line(Process child, StreamReader stream) => Within(child, stream.ReadLineAsync(), "write a line");

    private static T Within<T>(Process child, Task<T> read, string what)
    {
        if (read.Wait(Bound)) return read.Result;
        string args = string.Join(' ', child.StartInfo.ArgumentList.Skip(1));
        try { child.Kill(entireProcessTree: true); } catch (InvalidOperationException) { } // exited meanwhile
        throw new TimeoutException($"'livemig {args}' did not {what} within {Bound.TotalSeconds:0} s; killed");
    }
}
