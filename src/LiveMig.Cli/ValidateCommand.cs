using System.CommandLine;
using LiveMig.Protocol;
using LiveMig.Simulation;

namespace LiveMig.Cli;

/// <summary><c>livemig validate FILE</c> (issue 15): each migration of a scenario run for real (built-in VM, loopback, the engine's cap) and simulated, and the simulator's error.</summary>
internal static class ValidateCommand
{
    public static Command Create()
    {
        var file = new Argument<string>("FILE") { Description = "The scenario (docs/simulator.md): its VMs built-in (workload: \"random:rate=20000,range=32MiB\", fill:), its migrations a list (each run alone)." };
        var json = new Option<bool>("--json") { Description = "Print the result as one JSON object on stdout (the loopback link measured, the load, per migration both runs' figures and rounds and the errors)." };
        var seed = new Option<ulong?>("--seed") { Description = "Seed for the VMs (fill, workload) and the simulator's draws (default: the scenario's).", HelpName = "N" };
        var cmd = new Command("validate", "Runs each migration of a scenario twice: for real (a built-in VM as described, warmed up until the migration's start, migrated over loopback TCP to an agent in this process, the link capped with the engine's own --bandwidth to the scenario link's rate, verified) and in the simulator (the same VM, seed and options on a link with the loopback's measured rate and round trip); prints each one's total time, downtime, bytes and rounds and the simulator's relative error.")
        {
            file, json, seed,
        };
        cmd.SetAction(r => SimulateCommand.RunScenario("validate", r.GetValue(file)!, path =>
        {
            bool asJson = r.GetValue(json);
            var scenario = Scenario.Load(path);
            try
            {
                var result = ScenarioValidator.Run(scenario, path, r.GetValue(seed), progress: asJson ? null : line => Console.Error.WriteLine(PeerText.Escape(line)));
                if (asJson) Console.WriteLine(result.ToJson());
                else Render(result, Console.Out);
                return result.Migrations.All(m => m.Real.Outcome == "completed" && m.Verified == true) ? 0 : 1;
            }
            catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException or TimeoutException or InvalidOperationException)
            {
                // The real side could not run (the loopback link, the warm-up migration): one line, the VM stays nowhere.
                Console.Error.WriteLine($"livemig: validate: {PeerText.Escape(e.Message.Split('\n')[0])}");
                return 1;
            }
        }));
        return cmd;
    }

    private static void Render(ValidationResult v, TextWriter o)
    {
        o.WriteLine($"loopback {Units.Rate(v.Loopback.BytesPerSecond)} uncapped, round trip {v.Loopback.RoundTripUs:0} µs; load average {v.LoadBefore:0.##} → {v.LoadAfter:0.##} on {v.Cores} cores; seed {v.Seed}");
        var rows = new List<string[]> { new[] { "VM", "figure", "real", "simulated", "error" } };
        foreach (var m in v.Migrations)
        {
            string vm = $"{PeerText.Escape(m.Vm)} ({m.Strategy}, {PeerText.Escape(m.Workload)}, {m.Fill}, {Units.Bytes(m.MemoryBytes)}, cap {Units.Rate(m.CapBytesPerSecond)})";
            rows.Add([vm, "total time ms", $"{m.Real.TotalMs:0.0}", $"{m.Simulated.TotalMs:0.0}", Percent(m.Errors.TotalTime)]);
            rows.Add(["", "downtime ms", $"{m.Real.DowntimeMs:0.0}", $"{m.Simulated.DowntimeMs:0.0}", Percent(m.Errors.Downtime)]);
            rows.Add(["", "bytes", Units.Bytes(m.Real.BytesOnWire), Units.Bytes(m.Simulated.BytesOnWire), Percent(m.Errors.Bytes)]);
            rows.Add(["", "rounds", m.Real.Rounds.ToString(), m.Simulated.Rounds.ToString(), Percent(m.Errors.Rounds)]);
            rows.Add(["", "stop reason", Or(m.Real.StopReason), Or(m.Simulated.StopReason), ""]);
            if (m.Real.Faults is not null || m.Simulated.Faults is not null)
            {
                rows.Add(["", "faults", $"{m.Real.Faults:N0}", $"{m.Simulated.Faults:N0}", Percent(m.Errors.Faults)]);
                rows.Add(["", "fault p50 µs", $"{m.Real.FaultP50Us:0}", $"{m.Simulated.FaultP50Us:0}", ""]);
            }
            rows.Add(["", "outcome", m.Real.Outcome + (m.Verified == true ? ", verified" : ""), m.Simulated.Outcome, ""]);
            rows.Add(["", "page writes/s", $"{m.RealWritesPerSecond:0} (warm-up)", "the workload's rate", ""]);
        }
        int width0 = rows.Max(r => r[0].Length), width1 = rows.Max(r => r[1].Length), width2 = rows.Max(r => r[2].Length), width3 = rows.Max(r => r[3].Length);
        foreach (var r in rows)
            o.WriteLine($"{r[0].PadRight(width0)}  {r[1].PadRight(width1)}  {r[2].PadLeft(width2)}  {r[3].PadLeft(width3)}  {r[4]}".TrimEnd());
        foreach (var m in v.Migrations.Where(m => m.Real.Error is not null))
            o.WriteLine($"{PeerText.Escape(m.Vm)}: the real migration failed: {PeerText.Escape(m.Real.Error!)}");
    }

    private static string Or(string s) => s.Length > 0 ? s : "-";

    private static string Percent(double? e) => e is { } x ? $"{x * 100:+0.0;-0.0;0.0}%" : "-";
}
