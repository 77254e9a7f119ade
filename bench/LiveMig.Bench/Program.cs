using System.Diagnostics;

namespace LiveMig.Bench;

/// <summary>
/// End-to-end benchmarks of LiveMig over loopback TCP. Markdown on stdout (paste it), progress on stderr.
/// <code>
/// LiveMig.Bench throughput [--memory 4GiB] [--reps 3]
/// LiveMig.Bench downtime   [--memory 1GiB] [--reps 3] [--workloads idle,sweep,...]
/// LiveMig.Bench profile    [--memory 1GiB] [--reps 3]
/// LiveMig.Bench streams    [--memory 1GiB] [--reps 3] [--bandwidth RATE]
/// LiveMig.Bench round0     [--memory 1GiB] [--reps 5]
/// LiveMig.Bench stage-cost [--memory 1GiB] [--reps 5]
/// LiveMig.Bench all        [--reps 3]
/// LiveMig.Bench qemu-postcopy [--guest bootsector|linux] [--image IMG] [--kernel-dir DIR] [--memory 128MiB] [--bandwidth 128MiB] [--switch-after 5s] [--reps 1]
/// LiveMig.Bench qemu-precopy [--guest bootsector|linux] [--image IMG] [--kernel-dir DIR] [--memory 128MiB] [--bandwidth 128MiB] [--give-up 30s] [--switch-after 5s] [--reps 1] [--png FILE] [--systems TEXT,...]
/// LiveMig.Bench simulate   --count N --mode sequential|concurrent [--memory 2GiB] [--bandwidth 1Gbit] [--rate P] (bench/sim-speed.sh)
/// </code>
/// </summary>
public static class Program
{
    public static int Main(string[] args)
    {
        if (args.Length == 0 || args[0] is "-h" or "--help" or "help") return Usage(0);
        string scenario = args[0];
        if (scenario == "simulate") return SimulateScenario.Run(args[1..]); // options of its own
        if (scenario == "qemu-postcopy") return QemuPostCopyScenario.Run(args[1..]); // options of its own
        if (scenario == "qemu-precopy") return QemuPreCopyScenario.Run(args[1..]); // options of its own
        long? memory = null;
        int reps = 3;
        string[]? workloads = null;
        long bandwidth = 0;
        for (int i = 1; i < args.Length; i++)
        {
            string a = args[i];
            string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{a} needs a value");
            try
            {
                switch (a)
                {
                    case "--memory":
                        if (!Units.TryParseBytes(Next(), out long m) || m <= 0 || m % 4096 != 0) throw new ArgumentException("--memory must be a positive multiple of 4 KiB, e.g. 4GiB");
                        memory = m;
                        break;
                    case "--reps":
                        if (!int.TryParse(Next(), out reps) || reps < 1) throw new ArgumentException("--reps must be a positive whole number");
                        break;
                    case "--bandwidth":
                        if (!Units.TryParseRate(Next(), out bandwidth) || bandwidth <= 0) throw new ArgumentException("--bandwidth must be a rate, e.g. 1GiB (per second) or 10Gbit");
                        break;
                    case "--workloads":
                        workloads = Next().Split(';', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
                        break;
                    default:
                        throw new ArgumentException($"unknown option {a}");
                }
            }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine(e.Message);
                return Usage(2);
            }
        }

        if (scenario is not ("throughput" or "downtime" or "profile" or "streams" or "round0" or "stage-cost" or "all"))
        {
            Console.Error.WriteLine($"unknown scenario '{scenario}'");
            return Usage(2);
        }
        if (workloads is not null && scenario is not ("downtime" or "all"))
        {
            Console.Error.WriteLine("--workloads applies to the downtime scenario only");
            return Usage(2);
        }
        if (bandwidth > 0 && scenario != "streams")
        {
            Console.Error.WriteLine("--bandwidth applies to the streams scenario only");
            return Usage(2);
        }
        var output = Console.Out;
        var sw = Stopwatch.StartNew();
        output.WriteLine("## LiveMig end-to-end benchmarks");
        output.WriteLine();
        output.WriteLine($"Command: `LiveMig.Bench {string.Join(' ', args)}`");
        output.WriteLine();
        output.WriteLine(MachineInfo.Markdown());
        output.WriteLine($"Load average at start: {MachineInfo.LoadAverage()} (other work shares this machine).");
        output.WriteLine();
        if (scenario is "throughput" or "downtime" or "streams" or "round0" or "stage-cost" or "all") Warmup.Run();
        switch (scenario)
        {
            case "throughput":
                ThroughputScenario.Run(memory ?? 4L << 30, reps, output);
                break;
            case "downtime":
                DowntimeScenario.Run(memory ?? 1L << 30, reps, output, workloads);
                break;
            case "streams":
                StreamsScenario.Run(memory ?? 1L << 30, reps, output, bandwidth);
                break;
            case "round0":
                Round0Scenario.Run(memory ?? 1L << 30, reps, output);
                break;
            case "stage-cost":
                StageCostScenario.Run(memory ?? 1L << 30, reps, output);
                break;
            case "profile":
                ProfileScenario.Run(memory ?? 1L << 30, reps, output);
                break;
            case "all":
                if (memory is not null) { Console.Error.WriteLine("`all` uses 4 GiB for throughput and 1 GiB for downtime; run the scenarios on their own to change sizes"); return 2; }
                ThroughputScenario.Run(4L << 30, reps, output);
                DowntimeScenario.Run(1L << 30, reps, output, workloads);
                break;
            default:
                Console.Error.WriteLine($"unknown scenario '{scenario}'");
                return Usage(2);
        }
        output.WriteLine($"_Benchmark wall time: {sw.Elapsed.TotalMinutes:0.0} min; load average at the end: {MachineInfo.LoadAverage()}._");
        return 0;
    }

    private static int Usage(int code)
    {
        (code == 0 ? Console.Out : Console.Error).WriteLine("""
            usage: LiveMig.Bench <scenario> [options]
              throughput   4 GiB random-filled idle guest over loopback, verify on/off, vs plain TCP copies
              downtime     1 GiB guests (idle, sweep:rate=100000, sweep, hotcold), unlimited and 1 Gbit/s
              profile      each step of the page path timed alone (default 1 GiB): where the time goes
              round0       round 0 against its plain copy: prepared and fresh destination memory, verify on/off (default 1 GiB)
              stage-cost   1 GiB random-filled idle guest, no stage vs --optimize all, alternating (default 1 GiB)
              streams      1 GiB random-filled idle guest at 1, 2, 4 data streams, TLS off/on, vs plain TCP copies over 1, 2, 4 sockets
                           (--bandwidth RATE caps the migrations: TLS ÷ clear where the link sets the pace)
              all          throughput and downtime, default sizes
              qemu-postcopy  one guest by QEMU's postcopy-ram (and postcopy-preempt) and LiveMig's post-copy and hybrid,
                           same cap, bytes counted at the socket; with --guest linux a redis client's longest gap per row:
                           [--guest bootsector|linux] [--image IMG] [--kernel-dir guests/linux/out] [--memory 128MiB (linux 256MiB)]
                           [--bandwidth 128MiB] [--switch-after 5s] [--reps 1]
              qemu-precopy   one guest by QEMU's own migration (default, xbzrle, multifd+zstd, auto-converge, postcopy after
                           --switch-after) and by LiveMig (best, each stage alone), alternating, same cap, bytes at the socket;
                           QEMU cancelled after --give-up: [--guest bootsector|linux] [--image IMG] [--kernel-dir guests/linux/out]
                           [--memory 128MiB (linux 256MiB)] [--bandwidth 128MiB] [--give-up 30s] [--switch-after 5s] [--reps 1] [--png FILE]
                           [--systems TEXT,...] (only the rows whose name contains one of them)
              simulate     the simulator's speed: --count N --mode sequential|concurrent [--memory 2GiB] [--bandwidth 1Gbit]
                           [--rate PAGE_WRITES_PER_S | --intensity X] [--working-set SIZE] [--seed N] [--warmup] [--header] (one Markdown row; bench/sim-speed.sh)
            options:
              --memory SIZE      guest memory (throughput 4GiB, downtime, profile and streams 1GiB by default)
              --reps N           repetitions, median reported (default 3)
              --workloads LIST   downtime only: workloads separated by ';' (default idle;sweep:rate=100000;sweep;hotcold)
            """);
        return code;
    }
}
