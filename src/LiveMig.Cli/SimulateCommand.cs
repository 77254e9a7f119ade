using LiveMig.Protocol;
using System.CommandLine;
using System.Diagnostics;
using LiveMig.Simulation;

namespace LiveMig.Cli;

/// <summary><c>livemig simulate FILE</c> (issue 15): runs a scenario through the engine's own round controller and policies on a virtual clock.</summary>
internal static class SimulateCommand
{
    public static Command Create()
    {
        var file = new Argument<string>("FILE") { Description = "The scenario (YAML: hosts, links, routes, VMs with their workloads, migrations or an evacuation; docs/simulator.md)." };
        var json = new Option<bool>("--json") { Description = "Print the result as one JSON object on stdout (every migration with its rounds, every link's load)." };
        var seed = new Option<ulong?>("--seed") { Description = "Seed for the dirty models (default: the scenario's seed, else 1); the same scenario and seed give the same result.", HelpName = "N" };
        var png = new Option<string?>("--png") { Description = "Also draw a timeline of the migrations (handshake, rounds, downtime, post-copy phase) and each link's utilisation over time into this PNG file.", HelpName = "FILE" };
        var cmd = new Command("simulate", "Simulates the migrations of a scenario file: the engine's own round controller and policies (pre-copy's stop conditions, --on-stall, hot-page deferral, auto-converge, dirty limit; hybrid's budget; post-copy's push order) on a virtual clock, over modelled links shared max-min fairly, guests (by hand or a recorded trace) and codecs. Pre-copy, post-copy (switch, background push, demand faults) and hybrid. Prints a table per migration: strategy, total time, downtime, bytes, rounds, post-copy's faults, stop reason.")
        {
            file, json, seed, png,
        };
        cmd.SetAction(r => RunScenario("simulate", r.GetValue(file)!, path =>
        {
            var scenario = Scenario.Load(path);
            string? pngPath = r.GetValue(png);
            var wall = Stopwatch.StartNew();
            var result = new ScenarioRunner(scenario, r.GetValue(seed)) { RecordTimeline = pngPath is not null }.Run();
            wall.Stop();
            if (pngPath is not null)
            {
                try { SimulationPlots.Draw(result, pngPath); }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    Console.Error.WriteLine($"livemig: simulate: --png: {PeerText.Escape(e.Message.ReplaceLineEndings(" "))}");
                    return 2;
                }
            }
            if (r.GetValue(json)) Console.WriteLine(result.ToJson());
            else Render(result, wall.Elapsed, Console.Out);
            return 0;
        }));
        return cmd;
    }

    /// <summary>
    /// Runs the body of a command that reads a scenario file (simulate, validate, mtd simulate):
    /// a bad file — or a value the reader let through but a model refused — is one line on
    /// stderr naming the file, exit 2.
    /// </summary>
    internal static int RunScenario(string verb, string path, Func<string, int> body)
    {
        try { return body(path); }
        catch (ScenarioException e)
        {
            Console.Error.WriteLine($"livemig: {verb}: {PeerText.Escape(e.Message)}");
            return 2;
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"livemig: {verb}: {PeerText.Escape(path)}: {PeerText.Escape(e.Message.Split('\n')[0])}");
            return 2;
        }
    }

    /// <summary>Plain aligned text, one line a migration, whatever the terminal's width (so it pipes and greps).</summary>
    private static void Render(SimulationResult result, TimeSpan wall, TextWriter o)
    {
        var rows = new List<string[]> { new[] { "VM", "strategy", "from → to", "start s", "total s", "downtime ms", "bytes", "rounds", "faults", "stop reason", "outcome" } };
        foreach (var m in result.Migrations)
        {
            bool done = m.Outcome == "completed";
            rows.Add([PeerText.Escape(m.Vm), m.Strategy, $"{m.From} → {m.To}", $"{m.StartS:0.###}", m.Outcome == "skipped" ? "-" : $"{m.TotalS:0.###}",
                done ? $"{m.DowntimeMs:0.0}" : "-", Units.Bytes(m.BytesOnWire), m.Rounds.ToString(), m.SwitchedToPostCopy ? Faults(m) : "-",
                m.StopReason.Length > 0 ? m.StopReason : "-",
                m.Outcome + (m.Error is { } e && !done ? $": {Short(e)}" : "")]);
        }
        TextTable.Write(o, rows, rightAligned: [3, 4, 5, 6, 7, 8]);
        o.WriteLine();
        var links = new List<string[]> { new[] { "link", "bandwidth", "carried", "mean utilisation" } };
        foreach (var l in result.Links) links.Add([PeerText.Escape(l.Name), Units.Rate(l.BytesPerSecond), Units.Bytes(l.BytesCarried), $"{l.Utilisation * 100:0.0}%"]);
        TextTable.Write(o, links, rightAligned: [1, 2, 3]);
        o.WriteLine();
        int completed = result.Migrations.Count(m => m.Outcome == "completed");
        o.WriteLine($"{completed} of {result.Migrations.Count} migrations completed; {result.EndS:0.###} s of virtual time (seed {result.Seed}), {result.Events:N0} events in {wall.TotalMilliseconds:0} ms of wall time");
    }

    /// <summary>Post-copy's demand faults: how many, their median latency and the vCPU time they cost.</summary>
    private static string Faults(SimMigrationResult m) => m.PagesRequested == 0 ? "0"
        : $"{m.PagesRequested:N0} (p50 {m.FaultLatencyUs?.P50 / 1000:0.##} ms, waits {m.FaultWaitMs:0} ms)";

    /// <summary>The first clause of a long reason: the table keeps one line a migration (the JSON has it whole).</summary>
    private static string Short(string why)
    {
        int cut = why.IndexOf("; ", StringComparison.Ordinal);
        string s = cut > 0 ? why[..cut] : why;
        return s.Length > 100 ? s[..100] + "…" : s;
    }
}
