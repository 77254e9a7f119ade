using System.CommandLine;
using System.Diagnostics;
using LiveMig.Mtd;
using LiveMig.Protocol;
using LiveMig.Simulation;

namespace LiveMig.Cli;

/// <summary><c>livemig mtd simulate</c> and <c>livemig mtd run</c> (issue 16): moving target defence, modelled and for real.</summary>
internal static class MtdCommands
{
    public static Command Create(CliOptions o, Func<ParseResult, Func<int>, int> guard)
    {
        var mtd = new Command("mtd", "Moving target defence: keep a VM moving so that an attacker cannot stay beside it long enough. 'mtd simulate' weighs policies against a modelled attacker; 'mtd run' moves a real VM between agents on a schedule.");
        mtd.Add(Simulate());
        mtd.Add(MtdRunCommand.Create(o, guard));
        return mtd;
    }

    private static Command Simulate()
    {
        var file = new Argument<string>("SCENARIO") { Description = "The scenario (YAML: cloud, victim, attacker, detector, the policies to compare; docs/mtd.md)." };
        var json = new Option<bool>("--json") { Description = "Print the result as one JSON object on stdout (every configuration's security and cost, its compromise curve, the cost of a move per workload state)." };
        var seed = new Option<ulong?>("--seed") { Description = "Seed of the runs (default: the scenario's seed, else 1); the same scenario and seed give the same result.", HelpName = "N" };
        var png = new Option<string?>("--png") { Description = "Also draw security against cost per configuration, with the Pareto front, into this PNG file.", HelpName = "FILE" };
        var cmd = new Command("simulate", "Simulates an attacker who launches VMs until one lands beside the victim and needs so long there to succeed, against each defence policy of the scenario (none, periodic, Poisson, threat-triggered, cost-aware; destinations random, least-loaded, attacker-aware), each move priced by the simulator's migration of the victim. Prints per configuration the probability of attack success, the mean time to compromise and the cost per hour (migrations, bytes, downtime, degradation), and marks the Pareto front.")
        {
            file, json, seed, png,
        };
        cmd.SetAction(r => SimulateCommand.RunScenario("mtd simulate", r.GetValue(file)!, path =>
        {
            var scenario = MtdScenario.Load(path);
            var wall = Stopwatch.StartNew();
            var result = MtdSweep.Run(scenario, r.GetValue(seed));
            wall.Stop();
            if (r.GetValue(png) is { } pngPath)
            {
                try { DrawPng(result, pngPath); }
                catch (IOException e)
                {
                    Console.Error.WriteLine($"livemig: mtd simulate: --png: {PeerText.Escape(e.Message.ReplaceLineEndings(" "))}");
                    return 2;
                }
            }
            if (r.GetValue(json)) Console.WriteLine(result.ToJson());
            else Render(result, wall.Elapsed, Console.Out);
            return 0;
        }));
        return cmd;
    }

    private static void DrawPng(MtdResult result, string path)
    {
        try { MtdPlots.Draw(result, path); }
        catch (UnauthorizedAccessException e) { throw new IOException($"cannot write {path}: {e.Message}", e); }
    }

    /// <summary>The moves' costs per workload state, then one line a configuration (so it pipes and greps), the Pareto front marked.</summary>
    private static void Render(MtdResult result, TimeSpan wall, TextWriter o)
    {
        var costs = new List<string[]> { new[] { "workload state", "link", "migration s", "downtime ms", "bytes", "rounds", "outcome" } };
        foreach (var c in result.MoveCosts)
            costs.Add([c.State.ToString(), c.Link, $"{c.TotalS:0.###}", $"{c.DowntimeMs:0.0}", Units.Bytes(c.Bytes), c.Rounds.ToString(), c.Outcome]);
        o.WriteLine("cost of one move (the simulator's migration of the victim):");
        TextTable.Write(o, costs, rightAligned: [2, 3, 4, 5]);
        o.WriteLine();
        string axis = result.ParetoCost;
        var rows = new List<string[]> { new[] { "policy", "P(success)", "95% interval", "MTTC h", "moves/h", "bytes/h", "downtime ms/h", "degradation s/h", "alarms/h", $"front ({axis})" } };
        foreach (var c in result.Configurations)
        {
            rows.Add([c.Policy, $"{c.SuccessProbability:0.000}", $"{c.SuccessLow:0.000}-{c.SuccessHigh:0.000}", c.MeanTimeToCompromiseH is { } t ? $"{t:0.00}" : "-",
                $"{c.MovesPerHour:0.###}", Units.Bytes(c.BytesPerHour), $"{c.DowntimeMsPerHour:0.0}", $"{c.DegradationSPerHour:0.###}",
                $"{c.TrueAlarmsPerHour + c.FalseAlarmsPerHour:0.##}", c.Pareto ? "*" : ""]);
        }
        TextTable.Write(o, rows, rightAligned: [1, 3, 4, 5, 6, 7, 8]);
        o.WriteLine();
        o.WriteLine($"{result.Configurations.Count} configurations × {result.Runs} runs of {result.HorizonH:0.##} h (attack time {result.AttackTimeH:0.##} h, seed {result.Seed}); " +
                    $"{result.MigrationsSimulated} migrations simulated for the costs; {wall.TotalMilliseconds:0} ms of wall time");
    }
}

/// <summary>Plain aligned columns, two spaces apart.</summary>
internal static class TextTable
{
    public static void Write(TextWriter o, List<string[]> rows, int[] rightAligned)
    {
        int[] width = new int[rows[0].Length];
        foreach (var r in rows)
            for (int i = 0; i < r.Length; i++) width[i] = Math.Max(width[i], r[i].Length);
        foreach (var r in rows)
        {
            var cells = r.Select((c, i) => i == r.Length - 1 ? c : rightAligned.Contains(i) ? c.PadLeft(width[i]) : c.PadRight(width[i]));
            o.WriteLine(string.Join("  ", cells).TrimEnd());
        }
    }
}
