using LiveMig.Engine;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// Throughput: a guest of incompressible memory (every page random, idle workload) migrated over
/// loopback with no bandwidth limit, verification on and off, against the same bytes through a
/// plain TCP copy (into a reused array, and into fresh memfd guest memory) in the same run.
/// </summary>
internal static class ThroughputScenario
{
    private sealed record Rep(
        long WireBytes, double LiveOnRound0, double LiveOnTotal, double LiveOnDowntime, double LiveOnVerify,
        long WireBytesOff, double LiveOffRound0, double LiveOffTotal, double LiveOffDowntime,
        double Plain, double PlainMemfd, double PlainPopulated);

    public static void Run(long memoryBytes, int reps, TextWriter output)
    {
        var results = new List<Rep>();
        for (int r = 0; r < reps; r++)
        {
            var config = new VmConfig { Name = $"tput{r}", MemoryBytes = memoryBytes, Vcpus = 2, Workload = "idle", Fill = MemoryFill.Random, Seed = (ulong)(r + 1) };
            // Order inside a repetition: LiveMig (verify on), plain, plain → memfd, plain → populated memfd, LiveMig (verify off).
            var on = LoopbackMigration.Run(config, new MigrationOptions { Verify = true });
            Progress($"rep {r + 1}/{reps}: LiveMig verify=on   {Describe(on)}");
            var round0 = on.Source.Rounds[0];
            long bytes = round0.BytesSent;
            double plain = PlainCopy.Run(bytes, intoFreshGuestMemory: false);
            Progress($"rep {r + 1}/{reps}: plain socket copy  {plain:0.000} s, {Stats.GB(bytes) / plain:0.00} GB/s");
            double memfd = PlainCopy.Run(bytes, intoFreshGuestMemory: true);
            Progress($"rep {r + 1}/{reps}: plain copy → memfd {memfd:0.000} s, {Stats.GB(bytes) / memfd:0.00} GB/s");
            double populated = PlainCopy.Run(bytes, intoFreshGuestMemory: false, populateFirst: true);
            Progress($"rep {r + 1}/{reps}: plain copy → populated memfd {populated:0.000} s, {Stats.GB(bytes) / populated:0.00} GB/s");
            var off = LoopbackMigration.Run(config with { Name = $"tput{r}off" }, new MigrationOptions { Verify = false });
            Progress($"rep {r + 1}/{reps}: LiveMig verify=off  {Describe(off)}");
            results.Add(new Rep(
                bytes, round0.DurationMs / 1000, on.Source.TotalTimeMs / 1000, on.Source.DowntimeMs, on.Source.VerifyMs,
                off.Source.Rounds[0].BytesSent, off.Source.Rounds[0].DurationMs / 1000, off.Source.TotalTimeMs / 1000, off.Source.DowntimeMs,
                plain, memfd, populated));
        }

        long wire = (long)Stats.Median(results.Select(x => (double)x.WireBytes));
        output.WriteLine($"### Throughput: {Units.Bytes(memoryBytes)} guest, every page random (incompressible), workload `idle`, loopback TCP, no bandwidth limit");
        output.WriteLine();
        output.WriteLine($"Bytes per transfer: {wire:N0} ({Stats.GB(wire):0.000} GB; LiveMig's round-0 bytes on the wire, the plain copies push the same count). " +
                         $"GB = 10^9 bytes. Median of {reps}; the ratio is taken per repetition (same run), then the median.");
        output.WriteLine();
        output.WriteLine("| Transfer | Seconds | GB/s | Ratio to plain copy | Ratio to plain copy → memfd |");
        output.WriteLine("|---|---:|---:|---:|---:|");
        Row("Plain TCP copy (reused 1 MiB array)", r => r.Plain, r => r.WireBytes);
        Row("Plain TCP copy → fresh memfd memory (page-wise `CopyTo`)", r => r.PlainMemfd, r => r.WireBytes);
        Row("Plain TCP copy → memfd memory populated before the clock starts (`MADV_POPULATE_WRITE`)", r => r.PlainPopulated, r => r.WireBytes);
        Row("LiveMig, verify on: live transfer (round 0)", r => r.LiveOnRound0, r => r.WireBytes);
        Row("LiveMig, verify on: whole migration (total time)", r => r.LiveOnTotal, r => r.WireBytes);
        Row("LiveMig, verify off: live transfer (round 0)", r => r.LiveOffRound0, r => r.WireBytesOff);
        Row("LiveMig, verify off: whole migration (total time)", r => r.LiveOffTotal, r => r.WireBytesOff);
        output.WriteLine();
        output.WriteLine($"Downtime (pause → resumed), median: verify on {Stats.F(Stats.Median(results.Select(r => r.LiveOnDowntime)), "0")} ms " +
                         $"(of which hashing, source + destination: {Stats.F(Stats.Median(results.Select(r => r.LiveOnVerify)), "0")} ms), " +
                         $"verify off {Stats.F(Stats.Median(results.Select(r => r.LiveOffDowntime)), "0")} ms.");
        output.WriteLine();
        output.WriteLine("<details><summary>Per repetition (seconds)</summary>");
        output.WriteLine();
        output.WriteLine("| Rep | Plain | Plain → memfd | Plain → populated memfd | LiveMig on: round 0 | on: total | LiveMig off: round 0 | off: total |");
        output.WriteLine("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (int i = 0; i < results.Count; i++)
        {
            var x = results[i];
            output.WriteLine($"| {i + 1} | {x.Plain:0.000} | {x.PlainMemfd:0.000} | {x.PlainPopulated:0.000} | {x.LiveOnRound0:0.000} | {x.LiveOnTotal:0.000} | {x.LiveOffRound0:0.000} | {x.LiveOffTotal:0.000} |");
        }
        output.WriteLine();
        output.WriteLine("</details>");
        output.WriteLine();

        void Row(string name, Func<Rep, double> seconds, Func<Rep, long> bytes)
        {
            double s = Stats.Median(results.Select(seconds));
            double gbps = Stats.Median(results.Select(r => Stats.GB(bytes(r)) / seconds(r)));
            double ratio = Stats.Median(results.Select(r => (bytes(r) / seconds(r)) / (r.WireBytes / r.Plain)));
            double ratioMemfd = Stats.Median(results.Select(r => (bytes(r) / seconds(r)) / (r.WireBytes / r.PlainMemfd)));
            output.WriteLine($"| {name} | {s:0.000} | {gbps:0.00} | {ratio:0.00} | {ratioMemfd:0.00} |");
        }
    }

    private static string Describe(MigrationResult m)
    {
        var r0 = m.Source.Rounds[0];
        return $"round 0 {r0.DurationMs / 1000:0.000} s ({Stats.GB(r0.BytesSent) / (r0.DurationMs / 1000):0.00} GB/s), total {m.Source.TotalTimeMs / 1000:0.000} s, " +
               $"downtime {m.Source.DowntimeMs:0} ms, verify {m.Source.VerifyMs:0} ms, rounds {m.Source.Rounds.Count}, setup {m.SetupMs / 1000:0.0} s";
    }

    internal static void Progress(string line) => Console.Error.WriteLine(line);
}
