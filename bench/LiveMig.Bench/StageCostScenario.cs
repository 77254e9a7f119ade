using LiveMig.Engine;
using LiveMig.Pipeline;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// What every stage costs where none can pay (issue 11's target: ≤ 1.2× the time of no
/// stages): a guest of random, incompressible pages, `idle`, no cap, migrated with no stage
/// and with every one (`--optimize all`: compression chosen adaptively, XBZRLE, dedup, free-page
/// skipping), alternating within each repetition; the ratio is taken per repetition, then the median.
/// </summary>
internal static class StageCostScenario
{
    public static void Run(long memoryBytes, int reps, TextWriter output)
    {
        var none = new List<MigrationResult>();
        var all = new List<MigrationResult>();
        for (int r = 0; r < reps; r++)
        {
            var config = new VmConfig { Name = $"stages-{r}", MemoryBytes = memoryBytes, Vcpus = 2, Workload = "idle", Fill = MemoryFill.Random, Seed = (ulong)(r + 1) };
            foreach (bool stages in r % 2 == 0 ? new[] { false, true } : new[] { true, false })
            {
                var options = new MigrationOptions { Verify = true, Pipeline = stages ? PipelineOptions.All : new PipelineOptions() };
                var m = LoopbackMigration.Run(config with { Name = $"stages-{r}-{stages}" }, options);
                (stages ? all : none).Add(m);
                ThroughputScenario.Progress($"rep {r + 1}/{reps}: {(stages ? "every stage" : "no stage")}: total {m.Source.TotalTimeMs / 1000:0.000} s, {Units.Bytes(m.Source.BytesOnWire)}, " +
                                            $"pages {string.Join(", ", m.Source.PagesByEncoding.Where(p => p.Value > 0).Select(p => $"{p.Key} {p.Value}"))}, CPU all threads {m.ProcessCpuSeconds:0.00} s");
            }
        }
        output.WriteLine($"### Stage cost on incompressible memory: {Units.Bytes(memoryBytes)} guest, every page random, `idle`, loopback, no cap, verify on");
        output.WriteLine();
        output.WriteLine($"Median of {reps}, the two alternating within each repetition; ratio per repetition, then the median.");
        output.WriteLine();
        output.WriteLine("| Stages | Total s | Bytes on the wire | CPU, all threads, s | Time ratio to no stage |");
        output.WriteLine("|---|---:|---:|---:|---:|");
        double Ratio(int i) => all[i].Source.TotalTimeMs / none[i].Source.TotalTimeMs;
        foreach (var (name, runs) in new[] { ("none", none), ("all (`--optimize all`)", all) })
            output.WriteLine($"| {name} | {Stats.Median(runs.Select(m => m.Source.TotalTimeMs / 1000)):0.000} | {Units.Bytes((long)Stats.Median(runs.Select(m => (double)m.Source.BytesOnWire)))} | {Stats.Median(runs.Select(m => m.ProcessCpuSeconds)):0.00} | {(runs == all ? Stats.Median(Enumerable.Range(0, reps).Select(Ratio)).ToString("0.00") : "1.00")} |");
        output.WriteLine();
    }
}
