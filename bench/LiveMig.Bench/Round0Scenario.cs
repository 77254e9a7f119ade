using LiveMig.Engine;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// Round 0 against its like-for-like plain copy, the issue-11 targets: each repetition runs, in
/// this order, a plain TCP copy into populated memfd memory, LiveMig into prepared destination
/// memory (verify on), a plain copy into fresh memfd memory while a source-sized memfd is held
/// (as in a migration), LiveMig into fresh memory with verification on, then off; then both
/// again with the destination reading and placing on one thread (<c>PlacingThread</c> off). Ratios are
/// taken inside each repetition (same run), then the median; the CPU of the sending and
/// receiving threads per GB of payload, against the plain copy's.
/// </summary>
internal static class Round0Scenario
{
    private sealed record Sample(double Seconds, long Bytes, ThreadCpu Sender, ThreadCpu Receiver, double ProcessCpu)
    {
        public double GBps => Stats.GB(Bytes) / Seconds;
    }

    private const string PlainPopulated = "Plain TCP copy → populated memfd memory";
    private const string Prepared = "LiveMig round 0 → prepared memory (MemoryPool), verify on";
    private const string PlainFresh = "Plain TCP copy → fresh memfd memory (source-sized memfd held)";
    private const string FreshOn = "LiveMig round 0 → fresh memory, verify on";
    private const string FreshOff = "LiveMig round 0 → fresh memory, verify off";
    private const string PreparedOneThread = "LiveMig round 0 → prepared memory, verify on, receive and place on one thread";
    private const string FreshOneThread = "LiveMig round 0 → fresh memory, verify on, receive and place on one thread";

    public static void Run(long memoryBytes, int reps, TextWriter output)
    {
        var results = new List<Dictionary<string, Sample>>();
        for (int r = 0; r < reps; r++)
        {
            var rep = new Dictionary<string, Sample>();
            var config = new VmConfig { Name = $"r0-{r}", MemoryBytes = memoryBytes, Vcpus = 2, Workload = "idle", Fill = MemoryFill.Random, Seed = (ulong)(r + 1) };
            long bytes = 0;
            Sample Migrate(string name, MigrationOptions options, DestinationOptions? destination = null)
            {
                var m = LoopbackMigration.Run(config with { Name = $"r0-{r}-{rep.Count}" }, options, destination: destination);
                var r0 = m.Source.Rounds[0];
                bytes = r0.BytesSent;
                var run = new Sample(r0.DurationMs / 1000, r0.BytesSent, m.SourceCpu, m.DestinationCpu, m.ProcessCpuSeconds);
                ThroughputScenario.Progress($"rep {r + 1}/{reps}: {name}: {run.Seconds:0.000} s, {run.GBps:0.00} GB/s, CPU source {m.SourceCpu.TotalSeconds:0.00} s, destination {m.DestinationCpu.TotalSeconds:0.00} s, frame check {m.Source.FrameCheck}");
                return run;
            }
            Sample Plain(string name, bool fresh)
            {
                var (s, sender, receiver, process) = PlainCopy.Measure(bytes, fresh, populateFirst: !fresh, fresh ? memoryBytes : 0);
                var run = new Sample(s, bytes, sender, receiver, process);
                ThroughputScenario.Progress($"rep {r + 1}/{reps}: {name}: {s:0.000} s, {run.GBps:0.00} GB/s, CPU sender {sender.TotalSeconds:0.00} s, receiver {receiver.TotalSeconds:0.00} s");
                return run;
            }
            using (var pool = new LiveMig.Memory.MemoryPool(memoryBytes, 1))
            {
                pool.WaitReady(); // prepared before the migration, as an agent does before VMs arrive
                var prepared = Migrate(Prepared, new MigrationOptions { Verify = true }, new DestinationOptions { MemoryPool = pool });
                rep[PlainPopulated] = Plain(PlainPopulated, fresh: false);
                rep[Prepared] = prepared;
            }
            using (var pool = new LiveMig.Memory.MemoryPool(memoryBytes, 1))
            {
                pool.WaitReady();
                rep[PreparedOneThread] = Migrate(PreparedOneThread, new MigrationOptions { Verify = true }, new DestinationOptions { MemoryPool = pool, PlacingThread = false });
            }
            rep[PlainFresh] = Plain(PlainFresh, fresh: true);
            rep[FreshOn] = Migrate(FreshOn, new MigrationOptions { Verify = true });
            rep[FreshOff] = Migrate(FreshOff, new MigrationOptions { Verify = false });
            rep[FreshOneThread] = Migrate(FreshOneThread, new MigrationOptions { Verify = true }, new DestinationOptions { PlacingThread = false });
            results.Add(rep);
        }

        output.WriteLine($"### Round 0 against a plain copy: {Units.Bytes(memoryBytes)} guest, every page random, `idle`, loopback, one stream");
        output.WriteLine();
        output.WriteLine($"Median of {reps}; ratios per repetition (same run), then the median. CPU: the source's migration thread and the destination's receiving thread over the whole migration (the plain copy: its two threads), seconds per GB of payload; all threads: the whole process over the whole migration (the send and placing threads, the prefaulter, the switch-over's background compilation included) or the plain copy.");
        output.WriteLine();
        output.WriteLine("| Transfer | Seconds | GB/s | Ratio to its plain copy | Sender CPU s/GB | Receiver CPU s/GB | All threads CPU s/GB |");
        output.WriteLine("|---|---:|---:|---:|---:|---:|---:|");
        foreach (var (name, baseline) in new[] { (PlainPopulated, PlainPopulated), (Prepared, PlainPopulated), (PlainFresh, PlainFresh), (FreshOn, PlainFresh), (FreshOff, PlainFresh), (PreparedOneThread, PlainPopulated), (FreshOneThread, PlainFresh) })
        {
            double Med(Func<Dictionary<string, Sample>, double> f) => Stats.Median(results.Select(f));
            output.WriteLine($"| {name} | {Med(x => x[name].Seconds):0.000} | {Med(x => x[name].GBps):0.00} | {Med(x => x[name].GBps / x[baseline].GBps):0.00} | " +
                             $"{Med(x => x[name].Sender.TotalSeconds / Stats.GB(x[name].Bytes)):0.00} | {Med(x => x[name].Receiver.TotalSeconds / Stats.GB(x[name].Bytes)):0.00} | {Med(x => x[name].ProcessCpu / Stats.GB(x[name].Bytes)):0.00} |");
        }
        output.WriteLine();
        output.WriteLine($"Verify on ÷ off into fresh memory (round-0 time), median of the per-repetition ratios: {Stats.Median(results.Select(x => x[FreshOn].Seconds / x[FreshOff].Seconds)):0.00}.");
        output.WriteLine();
        output.WriteLine("<details><summary>Per repetition (GB/s)</summary>");
        output.WriteLine();
        output.WriteLine("| Rep | plain → populated | prepared, verify on | plain → fresh | fresh, verify on | fresh, verify off |");
        output.WriteLine("|---:|---:|---:|---:|---:|---:|");
        for (int i = 0; i < results.Count; i++)
        {
            var x = results[i];
            output.WriteLine($"| {i + 1} | {x[PlainPopulated].GBps:0.00} | {x[Prepared].GBps:0.00} | {x[PlainFresh].GBps:0.00} | {x[FreshOn].GBps:0.00} | {x[FreshOff].GBps:0.00} |");
        }
        output.WriteLine();
        output.WriteLine("</details>");
        output.WriteLine();
    }
}
