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

/// <summary>The <c>livemig</c> command as a child process of a test, its output redirected.</summary>
internal static class CliChild
{
    public static readonly string Dll = Path.Combine(AppContext.BaseDirectory, "LiveMig.Cli.dll");

    public static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(Dll);
        foreach (var a in args) psi.ArgumentList.Add(a);
        // A migrate of its own: the default control socket would collide with tests (or users) running beside it.
        if (args is ["migrate", ..] && !args.Contains("--control") && !args.Contains("--vm") && !args.Contains("--resume"))
        {
            psi.ArgumentList.Add("--control");
            psi.ArgumentList.Add(Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock"));
        }
        return Process.Start(psi)!;
    }

    /// <summary>Runs <c>livemig ARGS</c> to its end (bounded): its exit code, standard output and standard error.</summary>
    public static (int Code, string Out, string Err) Run(params string[] args)
    {
        using var p = Start(args);
        var err = p.StandardError.ReadToEndAsync();
        string output = ChildOutput.All(p, p.StandardOutput);
        Assert.True(p.WaitForExit(ChildOutput.Bound), $"livemig {string.Join(' ', args)} did not exit");
        return (p.ExitCode, output, err.Result);
    }
}
