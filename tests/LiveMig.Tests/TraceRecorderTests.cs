using System.Diagnostics;
using LiveMig.Traces;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// The recorder against a program whose writes are known (tracee/known_writes.c, built with gcc):
/// every page it writes once must be seen changed exactly once, and no other page of its buffer.
/// Skipped, saying why, without gcc.
/// </summary>
public class TraceRecorderTests(ITestOutputHelper output)
{
    internal sealed record Accuracy(int Written, int Missed, int Extra, int Outside, RecordingResult Result, TraceFile Trace);

    private static readonly Lazy<string?> Tracee = new(BuildTracee);

    private static string? BuildTracee()
    {
        string src = Path.Combine(AppContext.BaseDirectory, "tracee", "known_writes.c");
        if (!File.Exists("/usr/bin/gcc") || !File.Exists(src)) return null;
        string exe = Path.Combine(Directory.CreateTempSubdirectory("lmtracee").FullName, "known_writes");
        using var gcc = Process.Start("/usr/bin/gcc", ["-O2", "-o", exe, src]);
        return gcc.WaitForExit(60_000) && gcc.ExitCode == 0 ? exe : null;
    }

    internal static Accuracy Measure(int pages, int phases, int phaseMs, int perPhase, string mode, TimeSpan interval)
    {
        Skip.If(!OperatingSystem.IsLinux() || Tracee.Value is null, "gcc (or tracee/known_writes.c) is missing: cannot build the known-writes program");
        var psi = new ProcessStartInfo(Tracee.Value!) { RedirectStandardInput = true, RedirectStandardOutput = true };
        foreach (var a in new object[] { pages, phases, phaseMs, perPhase, mode, 14, -1 }) psi.ArgumentList.Add(a.ToString()!);
        using var p = Process.Start(psi)!;
        try
        {
            string? first = p.StandardOutput.ReadLine();
            Assert.NotNull(first);
            ulong bufferBase = Convert.ToUInt64(first!.Split(' ')[1], 16);
            var recorder = new TraceRecorder(p.Id, new RecorderOptions { Interval = interval, Duration = TimeSpan.FromMilliseconds(phases * phaseMs + 30_000) });
            var ms = new MemoryStream();
            var run = Task.Run(() =>
            {
                using var w = new TraceWriter(ms, new TraceHeader());
                return recorder.Run(w, CancellationToken.None);
            });
            // Start the writes once the initial image and a few scans are done (the first scans pay for compiling the code; bounded wait).
            var sw = Stopwatch.StartNew();
            while (recorder.ScansDone < 4 && !run.IsCompleted && sw.Elapsed < TimeSpan.FromSeconds(20)) Thread.Sleep(5);
            p.StandardInput.WriteLine("go");
            p.StandardInput.Flush();
            var written = new HashSet<int>();
            for (int k = 0; k < phases && p.StandardOutput.ReadLine() is { } line; k++)
                foreach (string page in line.Split(' ').Skip(3)) written.Add(int.Parse(page));
            // Let the last phase's writes happen, then two whole scans see them before the program exits
            // (the interval an exit cuts short is not part of a trace).
            Thread.Sleep(phaseMs);
            int scans = recorder.ScansDone;
            sw.Restart();
            while (recorder.ScansDone < scans + 2 && !run.IsCompleted && sw.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(5);
            p.StandardInput.WriteLine("exit");
            p.StandardInput.Flush();
            Assert.True(run.Wait(TimeSpan.FromSeconds(60)), "recorder did not stop after the target exited");
            var result = run.Result;
            Assert.Equal(TraceEndReason.TargetExited, result.Reason);
            var trace = TraceFile.Read(ms.ToArray());
            var pageOf = new Dictionary<int, int>(); // trace index → buffer page
            for (int i = 0; i < pages; i++)
            {
                int index = recorder.IndexOf(p.Id, bufferBase + (ulong)i * 4096);
                Assert.True(index >= 0, $"buffer page {i} is not in the initial image");
                pageOf[index] = i;
            }
            var seen = new Dictionary<int, int>();
            int outside = 0;
            foreach (var iv in trace.Intervals.Skip(1))
                foreach (int index in iv.Pages)
                {
                    if (pageOf.TryGetValue(index, out int bp)) seen[bp] = seen.GetValueOrDefault(bp) + 1;
                    else outside++;
                }
            int missed = written.Count(w => !seen.ContainsKey(w));
            int extra = seen.Sum(kv => written.Contains(kv.Key) ? kv.Value - 1 : kv.Value);
            return new Accuracy(written.Count, missed, extra, outside, result, trace);
        }
        finally
        {
            if (!p.HasExited) p.Kill();
        }
    }

    private void Report(string what, Accuracy a)
    {
        var scans = a.Result.ScanMs.Skip(1).Order().ToArray();
        output.WriteLine($"{what}: written {a.Written}, missed {a.Missed}, extra {a.Extra}, outside the buffer {a.Outside}; " +
                         $"{a.Result.Intervals - 1} intervals, scan median {scans[scans.Length / 2]:0.00} ms, max {scans[^1]:0.00} ms");
    }

    [SkippableFact]
    public void Burst_writes_are_seen_exactly_once_each()
    {
        var a = Measure(pages: 2048, phases: 3, phaseMs: 150, perPhase: 300, "burst", TimeSpan.FromMilliseconds(50));
        Report("burst", a);
        Assert.Equal(900, a.Written);
        Assert.Equal(0, a.Missed);
        Assert.Equal(0, a.Extra);
        Assert.True(a.Trace.Intervals[0].Count >= 2048, "initial image holds the buffer");
        Assert.All(a.Trace.Intervals.Skip(1).SelectMany(iv => iv.BytesChanged), b => Assert.InRange(b, 1, 4096));
    }

    [SkippableFact]
    public void A_command_that_exits_mid_recording_leaves_a_trace_sealed_with_its_full_intervals()
    {
        Skip.If(!OperatingSystem.IsLinux() || !File.Exists("/bin/sh"), "needs Linux and /bin/sh");
        string path = Path.Combine(Path.GetTempPath(), $"lmtrace-{Guid.NewGuid():N}.lmtrace");
        try
        {
            Assert.Equal(0, LiveMig.Cli.Program.Main(["trace", "record", "--interval", "50ms", "--out", path, "--", "/bin/sh", "-c", "sleep 1; exit 3"]));
            var t = TraceFile.Load(path);
            Assert.Equal(TraceEndReason.TargetExited, t.End.Reason);
            Assert.Contains("status 3", t.End.Note);
            // The initial image and the intervals completed before the exit (none on a very busy machine, where the first scan is slow).
            Assert.InRange(t.End.Intervals, 1, 40);
            Assert.True(t.End.Duration < TimeSpan.FromSeconds(1.5), $"trace of {t.End.Duration} for a 1 s command");
            Assert.False(File.Exists(path + TraceWriter.PartialSuffix));
        }
        finally { File.Delete(path); }
    }

    [SkippableFact]
    public void With_children_the_memory_of_a_child_process_is_recorded_too()
    {
        Skip.If(!OperatingSystem.IsLinux() || Tracee.Value is null || !File.Exists("/bin/sh"), "needs /bin/sh and gcc for the known-writes program");
        string path = Path.Combine(Path.GetTempPath(), $"lmtrace-{Guid.NewGuid():N}.lmtrace");
        try
        {
            // sh waits for its child, which maps and fills 8 MiB, writes 200 pages and stays 1.5 s (longer than a scan on a busy machine).
            string script = $"sleep 0.3; echo go | {Tracee.Value} 2048 2 100 100 burst 1 1500 > /dev/null; true";
            Assert.Equal(0, LiveMig.Cli.Program.Main(["trace", "record", "--children", "--interval", "50ms", "--out", path, "--", "/bin/sh", "-c", script]));
            var t = TraceFile.Load(path);
            Assert.True(t.End.PageSpace >= 2048, $"page space {t.End.PageSpace}: the child's 2048 pages were not read");
            Assert.True(t.Intervals.Skip(1).Sum(i => i.Count) >= 2048, "the child's pages did not show up as written");
        }
        finally { File.Delete(path); }
    }

    [SkippableFact]
    public void No_permission_to_read_the_target_is_one_clear_line_and_no_file()
    {
        Skip.If(!OperatingSystem.IsLinux() || Environment.UserName != "root" || !File.Exists("/usr/bin/setpriv"), "needs root and setpriv (util-linux) to run the recorder as another user");
        string cli = Path.Combine(AppContext.BaseDirectory, "LiveMig.Cli.dll");
        string path = Path.Combine(Path.GetTempPath(), $"lmtrace-{Guid.NewGuid():N}.lmtrace");
        var psi = new ProcessStartInfo("/usr/bin/setpriv") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in new[] { "--reuid=65534", "--regid=65534", "--clear-groups", "dotnet", cli, "trace", "record", "--pid", Environment.ProcessId.ToString(), "--out", path }) psi.ArgumentList.Add(a);
        psi.Environment["HOME"] = Path.GetTempPath();
        psi.Environment["DOTNET_CLI_HOME"] = Path.GetTempPath();
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        string err = p.StandardError.ReadToEnd();
        Assert.True(p.WaitForExit(60_000), "recorder did not finish");
        Skip.If(err.Contains("Permission denied") && !err.Contains("livemig:"), $"dotnet cannot run as nobody here: {err.Trim()}");
        Assert.Equal(1, p.ExitCode);
        string line = err.Split('\n', StringSplitOptions.RemoveEmptyEntries).Last();
        Assert.StartsWith($"livemig: no permission to read the memory of process {Environment.ProcessId}", line);
        Assert.False(File.Exists(path));
        Assert.False(File.Exists(path + TraceWriter.PartialSuffix));
    }

    private static string? Which(string tool) =>
        new[] { "/usr/bin", "/usr/local/bin", "/bin" }.Select(d => Path.Combine(d, tool)).FirstOrDefault(File.Exists);

    [SkippableFact]
    [Trait("Category", "Heavy")]
    public void Redis_under_redis_benchmark_records_a_trace_that_replays_and_migrates()
    {
        string? server = Which("redis-server"), bench = Which("redis-benchmark");
        Skip.If(server is null || bench is null, "redis-server or redis-benchmark is not installed (scripts/record-traces.sh installs them)");
        using var redis = Process.Start(new ProcessStartInfo(server!, ["--port", "6394", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]) { RedirectStandardOutput = true })!;
        string path = Path.Combine(Path.GetTempPath(), $"lmtrace-{Guid.NewGuid():N}.lmtrace");
        try
        {
            Thread.Sleep(500);
            using var load = Process.Start(new ProcessStartInfo(bench!, ["-p", "6394", "-q", "-n", "2000000", "-r", "100000", "-d", "128", "-t", "set,get", "-c", "20"]) { RedirectStandardOutput = true, RedirectStandardError = true })!;
            try
            {
                using (var w = TraceWriter.Create(path, new TraceHeader { Source = "redis-server under redis-benchmark" }))
                {
                    var r = new TraceRecorder(redis.Id, new RecorderOptions { Duration = TimeSpan.FromSeconds(4) }).Run(w, CancellationToken.None);
                    Assert.Equal(TraceEndReason.Completed, r.Reason);
                    Assert.True(r.PagesWritten > 100, $"only {r.PagesWritten} page writes recorded from redis under load");
                }
            }
            finally { if (!load.HasExited) load.Kill(); }
            var stats = TraceStats.Of(TraceFile.Load(path));
            Assert.True(stats.Writes.Compressible > 0.5, "redis's pages should mostly compress");
            long memory = ((stats.Trace.End.PageSpace * 4096L >> 26) + 1) << 26;
            using var loop = new Loopback(new LiveMig.Engine.DestinationOptions { DirtyLog = LiveMig.DirtyTracking.DirtyLogKind.Software });
            using var vm = LiveMig.Vm.BuiltInVm.Create(new LiveMig.Vm.VmConfig { MemoryBytes = Math.Max(memory, 64L << 20), Workload = $"trace:{path}", DirtyLog = LiveMig.DirtyTracking.DirtyLogKind.Software });
            vm.Start();
            Assert.True(SpinWait.SpinUntil(() => vm.Operations > stats.InitialImage.Pages, TimeSpan.FromSeconds(30)), "replay did not write the initial image");
            var (report, arrived) = loop.Migrate(vm);
            Assert.Equal("completed", report.Outcome);
            arrived.Vm.Pause();
            Assert.Null(arrived.Vm.CheckInvariant());
        }
        finally
        {
            if (!redis.HasExited) redis.Kill();
            File.Delete(path);
        }
    }

    [SkippableTheory]
    [Trait("Category", "Heavy")]
    [InlineData("burst", 100)]
    [InlineData("spread", 100)]
    [InlineData("spread", 20)]
    public void Accuracy_on_a_256_MiB_program(string mode, int intervalMs)
    {
        var a = Measure(pages: 65536, phases: 10, phaseMs: 500, perPhase: 6000, mode, TimeSpan.FromMilliseconds(intervalMs));
        Report($"{mode}, interval {intervalMs} ms", a);
        Assert.Equal(0, a.Missed);
        Assert.Equal(0, a.Extra);
    }
}
