using LiveMig.Engine;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// Throughput: a guest of incompressible memory (every page random, idle workload) migrated over
/// loopback with no bandwidth limit, verification on and off, against the same bytes through
/// plain TCP copies in the same run: into a reused array, into fresh memfd guest memory, and
/// into memfd memory populated before the clock starts.
/// </summary>
internal static class ThroughputScenario
{
    /// <summary>One timed transfer: wall seconds, bytes, and the CPU of the sending and receiving threads.</summary>
    private sealed record Transfer(double Seconds, long Bytes, ThreadCpu Sender, ThreadCpu Receiver)
    {
        public double BytesPerSecond => Bytes / Seconds;
    }

    private const string Plain = "Plain TCP copy (reused 1 MiB array)";
    private const string PlainMemfd = "Plain TCP copy → fresh memfd memory (page-wise `CopyTo`)";
    private const string PlainMemfdBallast = "Plain TCP copy → fresh memfd memory, while a source-sized memfd is held (as in a migration)";
    private const string PlainPopulated = "Plain TCP copy → memfd memory populated before the clock starts (`MADV_POPULATE_WRITE`)";
    private const string OnRound0 = "LiveMig, verify on: live transfer (round 0)";
    private const string OnTotal = "LiveMig, verify on: whole migration (total time)";
    private const string OffRound0 = "LiveMig, verify off: live transfer (round 0)";
    private const string OffTotal = "LiveMig, verify off: whole migration (total time)";
    private const string PreparedRound0 = "LiveMig, destination memory prepared ahead (listen --prealloc): live transfer (round 0)";
    private const string PreparedTotal = "LiveMig, destination memory prepared ahead (listen --prealloc): whole migration (total time)";
    private const string NoPrefaultRound0 = "LiveMig, destination prefault off: live transfer (round 0)";
    private const string NoPrefaultTotal = "LiveMig, destination prefault off: whole migration (total time)";

    public static void Run(long memoryBytes, int reps, TextWriter output)
    {
        var results = new List<Dictionary<string, Transfer>>();
        var downtime = new List<(double On, double Verify, double Off)>();
        for (int r = 0; r < reps; r++)
        {
            var rep = new Dictionary<string, Transfer>();
            var config = new VmConfig { Name = $"tput{r}", MemoryBytes = memoryBytes, Vcpus = 2, Workload = "idle", Fill = MemoryFill.Random, Seed = (ulong)(r + 1) };
            // Order inside a repetition: LiveMig (verify on), the four plain copies, LiveMig (verify off).
            var on = LoopbackMigration.Run(config, new MigrationOptions { Verify = true });
            Progress($"rep {r + 1}/{reps}: LiveMig verify=on   {Describe(on)}");
            long bytes = on.Source.Rounds[0].BytesSent;
            AddMigration(rep, on, OnRound0, OnTotal);
            foreach (var (name, fresh, populate, ballast) in new[] { (Plain, false, false, 0L), (PlainMemfd, true, false, 0L), (PlainMemfdBallast, true, false, memoryBytes), (PlainPopulated, false, true, 0L) })
            {
                var (s, sender, receiver, _) = PlainCopy.Measure(bytes, fresh, populate, ballast);
                rep[name] = new Transfer(s, bytes, sender, receiver);
                Progress($"rep {r + 1}/{reps}: {name}: {s:0.000} s, {Stats.GB(bytes) / s:0.00} GB/s, CPU sender {sender.TotalSeconds:0.00} s, receiver {receiver.TotalSeconds:0.00} s ({receiver.SystemSeconds:0.00} sys), {receiver.MinorFaults} faults");
            }
            var off = LoopbackMigration.Run(config with { Name = $"tput{r}off" }, new MigrationOptions { Verify = false });
            Progress($"rep {r + 1}/{reps}: LiveMig verify=off  {Describe(off)}");
            AddMigration(rep, off, OffRound0, OffTotal);
            var noPrefault = LoopbackMigration.Run(config with { Name = $"tput{r}np" }, new MigrationOptions { Verify = true }, destination: new DestinationOptions { Prefault = false });
            Progress($"rep {r + 1}/{reps}: LiveMig prefault=off {Describe(noPrefault)}");
            AddMigration(rep, noPrefault, NoPrefaultRound0, NoPrefaultTotal);
            using (var pool = new LiveMig.Memory.MemoryPool(memoryBytes, 1))
            {
                pool.WaitReady(); // prepared before the migration, as an agent does before VMs arrive
                var prepared = LoopbackMigration.Run(config with { Name = $"tput{r}pp" }, new MigrationOptions { Verify = true }, destination: new DestinationOptions { MemoryPool = pool });
                Progress($"rep {r + 1}/{reps}: LiveMig prepared   {Describe(prepared)}");
                AddMigration(rep, prepared, PreparedRound0, PreparedTotal);
            }
            results.Add(rep);
            downtime.Add((on.Source.DowntimeMs, on.Source.VerifyMs, off.Source.DowntimeMs));
        }

        long wire = (long)Stats.Median(results.Select(x => (double)x[Plain].Bytes));
        output.WriteLine($"### Throughput: {Units.Bytes(memoryBytes)} guest, every page random (incompressible), workload `idle`, loopback TCP, no bandwidth limit");
        output.WriteLine();
        output.WriteLine($"Bytes per transfer: {wire:N0} ({Stats.GB(wire):0.000} GB; LiveMig's round-0 bytes on the wire, the plain copies push the same count). " +
                         $"GB = 10^9 bytes. Median of {reps}; ratios are taken per repetition (same run), then the median.");
        output.WriteLine();
        output.WriteLine("| Transfer | Seconds | GB/s | Ratio to plain copy | Ratio to plain → fresh memfd | Ratio to plain → fresh memfd, source-sized memfd held |");
        output.WriteLine("|---|---:|---:|---:|---:|---:|");
        foreach (string name in new[] { Plain, PlainMemfd, PlainMemfdBallast, PlainPopulated, OnRound0, OnTotal, OffRound0, OffTotal, NoPrefaultRound0, NoPrefaultTotal, PreparedRound0, PreparedTotal })
        {
            double s = Stats.Median(results.Select(r => r[name].Seconds));
            double gbps = Stats.Median(results.Select(r => Stats.GB(r[name].BytesPerSecond)));
            double ratio = Stats.Median(results.Select(r => r[name].BytesPerSecond / r[Plain].BytesPerSecond));
            double ratioMemfd = Stats.Median(results.Select(r => r[name].BytesPerSecond / r[PlainMemfd].BytesPerSecond));
            double ratioBallast = Stats.Median(results.Select(r => r[name].BytesPerSecond / r[PlainMemfdBallast].BytesPerSecond));
            output.WriteLine($"| {name} | {s:0.000} | {gbps:0.00} | {ratio:0.00} | {ratioMemfd:0.00} | {ratioBallast:0.00} |");
        }
        output.WriteLine();
        output.WriteLine($"Downtime (pause → resumed), median: verify on {Stats.F(Stats.Median(downtime.Select(d => d.On)), "0")} ms " +
                         $"(of which hashing, source + destination: {Stats.F(Stats.Median(downtime.Select(d => d.Verify)), "0")} ms), " +
                         $"verify off {Stats.F(Stats.Median(downtime.Select(d => d.Off)), "0")} ms.");
        output.WriteLine();
        output.WriteLine("CPU time of the two threads that move the data (from /proc/thread-self/stat, 10 ms ticks; median). For LiveMig: the source's migration thread " +
                         "and the destination's receiving thread over the whole migration (the source's verification hash runs on the thread pool and is not counted). " +
                         "Busy = CPU ÷ wall time: a thread near 100% is the bottleneck; well below 100% on both means waiting (or CPU taken by other work on this shared machine).");
        output.WriteLine();
        output.WriteLine("| Transfer | Wall s | Sender CPU s (user + sys) | Sender busy | Receiver CPU s (user + sys) | Receiver busy | Receiver minor faults | Receiver sys µs per fault |");
        output.WriteLine("|---|---:|---:|---:|---:|---:|---:|---:|");
        foreach (string name in new[] { Plain, PlainMemfd, PlainMemfdBallast, PlainPopulated, OnTotal, OffTotal, NoPrefaultTotal, PreparedTotal })
        {
            double wall = Stats.Median(results.Select(r => r[name].Seconds));
            string Cpu(Func<Transfer, ThreadCpu> pick) =>
                $"{Stats.Median(results.Select(r => pick(r[name]).TotalSeconds)):0.00} ({Stats.Median(results.Select(r => pick(r[name]).UserSeconds)):0.00} + {Stats.Median(results.Select(r => pick(r[name]).SystemSeconds)):0.00})";
            string Busy(Func<Transfer, ThreadCpu> pick) => $"{Stats.Median(results.Select(r => pick(r[name]).TotalSeconds / r[name].Seconds)) * 100:0}%";
            output.WriteLine($"| {name.Replace(": whole migration (total time)", "")} | {wall:0.000} | {Cpu(t => t.Sender)} | {Busy(t => t.Sender)} | {Cpu(t => t.Receiver)} | {Busy(t => t.Receiver)} | {Stats.Median(results.Select(r => (double)r[name].Receiver.MinorFaults)):N0} | {PerFault(name)} |");
        }
        output.WriteLine();
        output.WriteLine("<details><summary>Per repetition (seconds)</summary>");
        string PerFault(string name) => results.All(r => r[name].Receiver.MinorFaults > 1000)
            ? Stats.F(Stats.Median(results.Select(r => r[name].Receiver.SystemSeconds * 1e6 / r[name].Receiver.MinorFaults)), "0.0")
            : "-";
        output.WriteLine();
        output.WriteLine("| Rep | Plain | Plain → fresh memfd | same, source-sized memfd held | Plain → populated memfd | LiveMig on: round 0 | on: total | LiveMig off: round 0 | off: total |");
        output.WriteLine("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (int i = 0; i < results.Count; i++)
        {
            var x = results[i];
            output.WriteLine($"| {i + 1} | {x[Plain].Seconds:0.000} | {x[PlainMemfd].Seconds:0.000} | {x[PlainMemfdBallast].Seconds:0.000} | {x[PlainPopulated].Seconds:0.000} | {x[OnRound0].Seconds:0.000} | {x[OnTotal].Seconds:0.000} | {x[OffRound0].Seconds:0.000} | {x[OffTotal].Seconds:0.000} |");
        }
        output.WriteLine();
        output.WriteLine("</details>");
        output.WriteLine();
    }

    private static void AddMigration(Dictionary<string, Transfer> rep, MigrationResult m, string round0Name, string totalName)
    {
        var r0 = m.Source.Rounds[0];
        rep[round0Name] = new Transfer(r0.DurationMs / 1000, r0.BytesSent, default, default);
        rep[totalName] = new Transfer(m.Source.TotalTimeMs / 1000, r0.BytesSent, m.SourceCpu, m.DestinationCpu);
    }

    private static string Describe(MigrationResult m)
    {
        var r0 = m.Source.Rounds[0];
        return $"round 0 {r0.DurationMs / 1000:0.000} s ({Stats.GB(r0.BytesSent) / (r0.DurationMs / 1000):0.00} GB/s), total {m.Source.TotalTimeMs / 1000:0.000} s, " +
               $"downtime {m.Source.DowntimeMs:0} ms, verify {m.Source.VerifyMs:0} ms, rounds {m.Source.Rounds.Count}, setup {m.SetupMs / 1000:0.0} s, " +
               $"CPU source {m.SourceCpu.TotalSeconds:0.00} s ({m.SourceCpu.SystemSeconds:0.00} sys), destination {m.DestinationCpu.TotalSeconds:0.00} s ({m.DestinationCpu.SystemSeconds:0.00} sys), {m.DestinationCpu.MinorFaults} faults";
    }

    internal static void Progress(string line) => Console.Error.WriteLine(line);
}
