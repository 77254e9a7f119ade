using LiveMig.Engine;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// Downtime: VMs running each workload, migrated over loopback with the default options
/// (300 ms downtime limit, verification on) but <c>--on-stall pause</c>: a migration whose
/// rounds stall pauses anyway (with the default <c>abort</c> the non-converging rows would fail
/// instead, which is what a user gets; here we measure the stop-and-copy), unlimited and capped
/// at 1 Gbit/s.
/// </summary>
internal static class DowntimeScenario
{
    public static readonly string[] Workloads = ["idle", "sweep:rate=100000", "sweep", "hotcold"];
    public static readonly (string Name, long BytesPerSecond)[] Links = [("unlimited", 0), ("1 Gbit/s", 125_000_000)];

    /// <summary>How long the guest runs its workload before the migration starts (so a sweep has a pass under way).</summary>
    public static readonly TimeSpan Warmup = TimeSpan.FromMilliseconds(500);

    public static void Run(long memoryBytes, int reps, TextWriter output, IReadOnlyList<string>? workloads = null)
    {
        var rows = new List<(string Workload, string Link, List<MigrationResult> Runs)>();
        foreach (string workload in workloads ?? Workloads)
        foreach (var (linkName, rate) in Links)
        {
            var runs = new List<MigrationResult>();
            for (int r = 0; r < reps; r++)
            {
                var config = new VmConfig { Name = $"dt{r}", MemoryBytes = memoryBytes, Vcpus = 2, Workload = workload, Fill = MemoryFill.Mixed, Seed = (ulong)(r + 1) };
                var m = LoopbackMigration.Run(config, new MigrationOptions { BandwidthLimit = rate, PreCopy = new Policies.PreCopyOptions().PauseOnStall() }, Warmup);
                runs.Add(m);
                var s = m.Source;
                ThroughputScenario.Progress($"{workload} @ {linkName} rep {r + 1}/{reps}: downtime {s.DowntimeMs:0} ms, verify {s.VerifyMs:0} ms, total {s.TotalTimeMs / 1000:0.00} s, " +
                                            $"rounds {s.Rounds.Count}, {s.StopReason}, {Units.Bytes(s.BytesOnWire)} on wire, dirty log {s.DirtyLog}");
            }
            rows.Add((workload, linkName, runs));
        }

        output.WriteLine($"### Downtime: {Units.Bytes(memoryBytes)} guest, 2 vCPUs, fill `Mixed`, default options (downtime limit 300 ms, verify on) with `--on-stall pause` (stalled rounds pause anyway), loopback TCP");
        output.WriteLine();
        output.WriteLine($"Median of {reps} (each column on its own); downtime also as (min–max). The guest runs its workload {Warmup.TotalMilliseconds:0} ms before the migration starts. " +
                         "Downtime = source pause → destination resumed (as the source sees it); verify = hashing time (`verifyMs`), total (source + destination): the source hashes while the final round goes out, the destination after it, before resuming; " +
                         "rounds include the final stop-and-copy round.");
        output.WriteLine();
        output.WriteLine("| Workload | Link | Downtime ms | Verify ms (source + destination) | Total s | Rounds | Stop reason | Final round pages | Bytes on wire |");
        output.WriteLine("|---|---|---:|---:|---:|---:|---|---:|---:|");
        foreach (var (workload, link, runs) in rows)
        {
            var src = runs.Select(x => x.Source).ToList();
            output.WriteLine($"| `{workload}` | {link} | {Stats.Spread(src.Select(s => s.DowntimeMs).ToList())} | {Stats.F(Stats.Median(src.Select(s => s.VerifyMs)), "0")} ({Stats.F(Stats.Median(runs.Select(m => m.Source.VerifyMs - m.Destination.VerifyMs)), "0")} + {Stats.F(Stats.Median(runs.Select(m => m.Destination.VerifyMs)), "0")}) | " +
                             $"{Stats.F(Stats.Median(src.Select(s => s.TotalTimeMs / 1000)), "0.00")} | {Stats.F(Stats.Median(src.Select(s => (double)s.Rounds.Count)), "0")} | " +
                             $"{Stats.Mode(src.Select(s => s.StopReason))} | {Stats.F(Stats.Median(src.Select(s => (double)s.Rounds[^1].PagesSent)), "0")} | " +
                             $"{Units.Bytes(Stats.Median(src.Select(s => (double)s.BytesOnWire)))} |");
        }
        output.WriteLine();
    }
}
