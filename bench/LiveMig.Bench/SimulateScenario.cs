using System.Diagnostics;
using LiveMig.Policies;
using LiveMig.Simulation;

namespace LiveMig.Bench;

/// <summary>
/// The simulator's speed (issue 15): N migrations of alike VMs from one host to another over one
/// shared link, one after another (sequential) or all at once (concurrent), through the engine's
/// round controller and policy. Prints one Markdown row: migrations per wall second, events,
/// virtual time, and the process's peak resident memory (VmHWM: run one cell per process for a
/// clean figure, as bench/sim-speed.sh does). Nothing here is a test; figures need a quiet machine.
/// <code>
/// LiveMig.Bench simulate --count 1000 --mode sequential|concurrent [--memory 2GiB] [--bandwidth 1Gbit]
///                        [--rate PAGES_PER_S | --intensity X] [--working-set SIZE] [--latency TIME]
///                        [--downtime-limit TIME] [--state SIZE] [--seed N] [--warmup] [--header]
/// </code>
/// <c>--warmup</c> first runs the same scenario with at most 20 VMs, untimed: the timed run then
/// excludes the JIT's first compilation of the simulator (as SimGrid's figure excludes its C++
/// build), which otherwise is 0.1–0.2 s of a cell — most of a 1,000-migration cell's time.
/// <c>--intensity X</c> is SimGrid's dirty page intensity: dirty bytes per second = X × the link's
/// rate (the migration speed), so page writes per second = X × bandwidth ÷ 4096 (bench/simgrid).
/// <code>
/// </code>
/// </summary>
internal static class SimulateScenario
{
    public static int Run(string[] args)
    {
        int count = 1000;
        bool concurrent = false, header = false, warmup = false;
        long memory = 2L << 30, workingSet = 0;
        double bandwidth = 125e6, rate = 0, intensity = -1;
        long state = 64 << 10;
        var latency = TimeSpan.FromMilliseconds(0.1);
        var precopy = new PreCopyOptions();
        ulong seed = 1;
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{a} needs a value");
            try
            {
                switch (a)
                {
                    case "--count": count = int.TryParse(Next(), out int c) && c > 0 ? c : throw new ArgumentException("--count: a positive whole number"); break;
                    case "--mode":
                        concurrent = Next() switch { "sequential" => false, "concurrent" => true, var other => throw new ArgumentException($"--mode '{other}': sequential or concurrent") };
                        break;
                    case "--memory": memory = Units.TryParseBytes(Next(), out long m) && m >= 4096 ? m : throw new ArgumentException("--memory: a size such as 2GiB"); break;
                    case "--working-set": workingSet = Units.TryParseBytes(Next(), out long w) && w >= 4096 ? w : throw new ArgumentException("--working-set: a size such as 256MiB"); break;
                    case "--bandwidth": bandwidth = Units.TryParseRate(Next(), out long b) && b > 0 ? b : throw new ArgumentException("--bandwidth: a rate such as 1Gbit"); break;
                    case "--rate": rate = double.TryParse(Next(), System.Globalization.CultureInfo.InvariantCulture, out double r) && r >= 0 ? r : throw new ArgumentException("--rate: page writes per second per VM, ≥ 0"); break;
                    case "--intensity": intensity = double.TryParse(Next(), System.Globalization.CultureInfo.InvariantCulture, out double x) && x >= 0 ? x : throw new ArgumentException("--intensity: SimGrid's dirty page intensity, ≥ 0 (0.1 = dirty bytes/s a tenth of the link)"); break;
                    case "--latency": latency = Units.TryParseDuration(Next(), out var l) ? l : throw new ArgumentException("--latency: a duration such as 0.1ms"); break;
                    case "--downtime-limit": precopy = precopy with { DowntimeLimit = Units.TryParseDuration(Next(), out var d) && d > TimeSpan.Zero ? d : throw new ArgumentException("--downtime-limit: a positive duration such as 30ms") }; break;
                    case "--state": state = Units.TryParseBytes(Next(), out long st) ? st : throw new ArgumentException("--state: a size such as 64KiB"); break;
                    case "--seed": seed = ulong.TryParse(Next(), out ulong s) ? s : throw new ArgumentException("--seed: a whole number"); break;
                    case "--header": header = true; break;
                    case "--warmup": warmup = true; break;
                    default: throw new ArgumentException($"unknown option {a}");
                }
            }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine($"simulate: {e.Message}");
                return 2;
            }
        }
        if (intensity >= 0) rate = intensity * bandwidth / 4096;
        long pages = memory / 4096;
        long wws = workingSet > 0 ? Math.Min(pages, workingSet / 4096) : Math.Max(1, pages / 10);
        Scenario Make(int n) => new()
        {
            Seed = seed,
            Hosts = ["src", "dst"],
            Links = [new LinkSpec("shared", bandwidth, latency, ("src", "dst"))],
            Vms = [new VmSpec { Name = "vm", Host = "src", Pages = pages, Count = n, StateBytes = state, Phases = [new DirtyPhase(0, rate, wws)], Content = new ContentMixModel(new ContentShares()) }],
            Evacuations = [new EvacuationSpec("src", ["dst"], concurrent, concurrent ? int.MaxValue : 1, TimeSpan.Zero, new SimMigrationOptions { PreCopy = precopy })],
            Horizon = TimeSpan.FromDays(3650),
        };
        if (warmup) ScenarioRunner.Run(Make(Math.Min(count, 20)));
        var scenario = Make(count);
        var wall = Stopwatch.StartNew();
        var result = ScenarioRunner.Run(scenario);
        wall.Stop();
        int completed = result.Migrations.Count(m => m.Outcome == "completed");
        double meanRounds = result.Migrations.Average(m => m.Rounds);
        double meanTotal = result.Migrations.Average(m => m.TotalS);
        if (header)
        {
            Console.WriteLine("| mode | migrations | memory | link | page writes/s per VM | completed | mean rounds | mean total s | virtual time s | events | wall s | migrations / wall s | peak RSS |");
            Console.WriteLine("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        Console.WriteLine($"| {(concurrent ? "concurrent" : "sequential")} | {count:N0} | {Units.Bytes(memory)} | {Units.Rate(bandwidth)} | {rate:N0} | {completed:N0} | {meanRounds:0.0} | {meanTotal:0.000} | {result.EndS:N1} | {result.Events:N0} | {wall.Elapsed.TotalSeconds:0.000} | {count / wall.Elapsed.TotalSeconds:N0} | {Units.Bytes(PeakResidentBytes())} |");
        return 0;
    }

    /// <summary>The process's peak resident set (VmHWM in /proc/self/status), or 0 where that is not readable.</summary>
    private static long PeakResidentBytes()
    {
        try
        {
            foreach (string line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("VmHWM:", StringComparison.Ordinal) && long.TryParse(line[6..].Trim().Split(' ')[0], out long kib)) return kib * 1024;
        }
        catch (IOException) { }
        return 0;
    }
}
