using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text;
using LiveMig.Traces;

namespace LiveMig.Cli;

/// <summary><c>livemig trace record</c> and <c>livemig trace show</c> (issue 14).</summary>
internal static partial class TraceCommands
{
    public static Command Create()
    {
        var trace = new Command("trace", "Records how a real process dirties its memory (trace record), and describes a recorded trace (trace show); replay one with --workload trace:FILE.");
        trace.Add(RecordCommand());
        trace.Add(TraceShow.Command());
        return trace;
    }

    private static Command RecordCommand()
    {
        var interval = new Option<string>("--interval") { Description = "How often to scan the target's memory.", DefaultValueFactory = _ => "100ms", HelpName = "TIME" };
        var duration = new Option<string?>("--duration") { Description = "Stop after this long (default: when the target exits, or Ctrl-C). A COMMAND started here is then stopped (SIGTERM).", HelpName = "TIME" };
        var output = new Option<string>("--out") { Description = "Trace file to write (written as FILE.partial and renamed when complete).", DefaultValueFactory = _ => "trace.lmtrace", HelpName = "FILE" };
        var pid = new Option<int?>("--pid") { Description = "Record this running process.", HelpName = "PID" };
        var children = new Option<bool>("--children") { Description = "Also record the target's descendant processes (multi-process programs such as PostgreSQL or make); pages they share count once." };
        var mapping = new Option<string?>("--mapping") { Description = "Record only the target's writable mappings of this file, e.g. a QEMU guest's RAM file (/dev/shm/...): the guest's whole RAM, its page cache included, none of QEMU's own memory.", HelpName = "FILE" };
        var command = new Argument<string[]>("COMMAND") { Description = "After --: a command to start and record.", Arity = ArgumentArity.ZeroOrMore };
        var record = new Command("record", "Records which pages of a live process change, interval by interval, by reading its writable mappings from outside (process_vm_readv) and comparing page hashes; needs ptrace access to it.")
        {
            interval, duration, output, pid, children, mapping, command,
        };
        record.SetAction(r => Guard(() =>
        {
            string iv = r.GetValue(interval)!;
            if (!Units.TryParseDuration(iv, out var every) || every < TimeSpan.FromMilliseconds(10) || every > TimeSpan.FromHours(1))
                throw new UsageException($"--interval '{iv}': expected a duration from 10ms to 1h, such as 100ms");
            TimeSpan? length = null;
            if (r.GetValue(duration) is { } dt)
            {
                if (!Units.TryParseDuration(dt, out var d) || d < every || d > TimeSpan.FromDays(1))
                    throw new UsageException($"--duration '{dt}': expected a duration from one interval to 1 day, such as 60s");
                length = d;
            }
            string[] argv = r.GetValue(command) ?? [];
            int? target = r.GetValue(pid);
            if ((target is not null) == (argv.Length > 0)) throw new UsageException("give either --pid PID or -- COMMAND..., not both or neither");
            if (target is <= 0) throw new UsageException($"--pid {target}: expected a process ID");
            string? only = r.GetValue(mapping);
            if (only is not null && (only.Length == 0 || only[0] != '/')) throw new UsageException($"--mapping '{Printable(only)}': expected an absolute file path as /proc/PID/maps shows it, such as /dev/shm/NAME");
            var options = new RecorderOptions { Interval = every, Duration = length, Children = r.GetValue(children), Mapping = only };
            return Record(target, argv, options, r.GetValue(output)!);
        }));
        return record;
    }

    private static int Record(int? pid, string[] argv, RecorderOptions options, string path)
    {
        Process? started = null;
        if (pid is null)
        {
            var psi = new ProcessStartInfo(argv[0]);
            foreach (string a in argv.Skip(1)) psi.ArgumentList.Add(a);
            try { started = Process.Start(psi)!; }
            catch (System.ComponentModel.Win32Exception e) { throw new UsageException($"COMMAND '{Printable(argv[0])}': cannot start it: {e.Message}"); }
            pid = started.Id;
        }
        else if (!Directory.Exists($"/proc/{pid}")) throw new UsageException($"--pid {pid}: no such process");
        string source = started is null ? $"pid {pid} ({Comm(pid.Value)})" : string.Join(' ', argv);
        using var stop = new CancellationTokenSource();
        // Ctrl-C or a plain kill ends the recording with the intervals so far, sealed.
        Action<PosixSignalContext> onSignal = c => { c.Cancel = true; stop.Cancel(); };
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, onSignal);
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, onSignal);
        try
        {
            RecordingResult result;
            using (var writer = TraceWriter.Create(path, new TraceHeader { NominalInterval = options.Interval, Started = DateTimeOffset.UtcNow, Source = source }))
            {
                Console.Error.WriteLine($"recording process {pid} ({Printable(source)}) every {options.Interval.TotalMilliseconds:0} ms into {Printable(path)}");
                // The recorder can see the exit (its /proc entry gone) before the runtime has reaped it: wait for that a little.
                result = new TraceRecorder(pid.Value, options).Run(writer, stop.Token, () => started?.WaitForExit(2000) == true ? $" with status {started.ExitCode}" : "");
            }
            Summarise(path, result, pid.Value);
            return 0;
        }
        finally { StopStarted(started); }
    }

    private static void Summarise(string path, RecordingResult r, int pid)
    {
        if (r.Reason == TraceEndReason.TargetExited)
            Console.Error.WriteLine($"process {pid} exited after {r.Duration.TotalSeconds:0.0} s: the trace is sealed with its {r.Intervals - 1} full intervals");
        var scans = r.ScanMs.Order().ToArray();
        double p50 = scans[scans.Length / 2], max = scans[^1];
        Console.Error.WriteLine($"{Printable(path)}: {r.Intervals - 1} intervals over {r.Duration.TotalSeconds:0.0} s, page space {r.PageSpace:N0} pages ({Units.Bytes(r.PageSpace * 4096.0)}), {r.PagesWritten:N0} page writes; " +
                                $"file {Units.Bytes(new FileInfo(path).Length)}; a scan took {p50:0.0} ms (median), {max:0.0} ms (max)");
    }

    /// <summary>A COMMAND this recorder started does not outlive the recording: SIGTERM, then SIGKILL after 5 s.</summary>
    private static void StopStarted(Process? p)
    {
        if (p is null) return;
        using (p)
        {
            if (p.HasExited) return;
            _ = kill(p.Id, 15);
            if (!p.WaitForExit(5000)) p.Kill(entireProcessTree: true);
        }
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int kill(int pid, int signal);

    private static string Comm(int pid)
    {
        try { return File.ReadAllText($"/proc/{pid}/comm").Trim(); }
        catch (IOException) { return "?"; }
    }

    /// <summary>Runs a trace command: bad options exit 2, a bad file or a refused target 1, each as one line.</summary>
    internal static int Guard(Func<int> body)
    {
        try { return body(); }
        catch (UsageException e) { return Fail(e.Message, 2); }
        catch (InvalidDataException e) { return Fail(e.Message, 1); }
        catch (UnauthorizedAccessException e) { return Fail(e.Message, 1); }
        catch (Exception e) when (e is IOException or InvalidOperationException) { return Fail(e.Message, 1); }
    }

    private static int Fail(string message, int code)
    {
        Console.Error.WriteLine($"livemig: {Printable(message)}");
        return code;
    }

    /// <summary>File and process text with control characters shown as \xNN, so it cannot drive the terminal.</summary>
    internal static string Printable(string text)
    {
        var sb = new StringBuilder(text.Length);
        foreach (char c in text) sb.Append(char.IsControl(c) ? $"\\x{(int)c:x2}" : c);
        return sb.ToString();
    }
}
