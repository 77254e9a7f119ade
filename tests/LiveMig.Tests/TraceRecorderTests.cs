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
        foreach (var a in new object[] { pages, phases, phaseMs, perPhase, mode, 14 }) psi.ArgumentList.Add(a.ToString()!);
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
            while (p.StandardOutput.ReadLine() is { } line)
                foreach (string page in line.Split(' ').Skip(3)) written.Add(int.Parse(page));
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
        var a = Measure(pages: 2048, phases: 4, phaseMs: 250, perPhase: 300, "burst", TimeSpan.FromMilliseconds(50));
        Report("burst", a);
        Assert.Equal(1200, a.Written);
        Assert.Equal(0, a.Missed);
        Assert.Equal(0, a.Extra);
        Assert.True(a.Trace.Intervals[0].Count >= 2048, "initial image holds the buffer");
        Assert.All(a.Trace.Intervals.Skip(1).SelectMany(iv => iv.BytesChanged), b => Assert.InRange(b, 1, 4096));
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
