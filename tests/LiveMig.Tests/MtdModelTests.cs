using System.Text.Json;
using LiveMig.Mtd;
using LiveMig.Simulation;

namespace LiveMig.Tests;

/// <summary>The moving-target-defence model (issue 16) against closed forms, and its costs against the simulator's migrations.</summary>
public class MtdModelTests
{
    /// <summary>A small idle victim over 10 Gbit/s: every move costs the same (no randomness in its migration).</summary>
    private const string IdleVictim = "victim: {memory: 256MiB}\n";

    private static MtdScenario Parse(string yaml) => MtdScenario.Parse(yaml, "test.yaml", Path.GetTempPath());

    private static MtdSummary Only(MtdResult r) => Assert.Single(r.Configurations);

    [Fact]
    public void Periodic_moves_more_often_than_the_attack_time_give_no_success_without_a_detector_and_rarer_ones_do()
    {
        // A busy attacker: it finds the victim within minutes after each move (and no host fills up, which would keep it out).
        string yaml = "runs: 100\nhorizon: 7d\ncloud: {hosts: 4, slots: 20, load: 50%, placement: random}\n" + IdleVictim +
                      "attacker: {launch-every: 2m, launch-time: 1m, max-vms: 3, attack-time: 2h}\n" +
                      "policies: [none, {kind: periodic, every: [30m, 119m, 150m]}]\n";
        var r = MtdSweep.Run(Parse(yaml));
        var by = r.Configurations.ToDictionary(c => c.Policy);
        Assert.Equal(1.0, by["none"].SuccessProbability);
        // The victim stays on a host from one move's completion to the next's: exactly the interval (every move takes as long).
        Assert.Equal(0, by["periodic 30m → random"].Compromised);
        Assert.Equal(0, by["periodic 119m → random"].Compromised);
        Assert.True(by["periodic 150m → random"].SuccessProbability > 0.9, $"150 min stays against a 2 h attack: {by["periodic 150m → random"].SuccessProbability}");
        Assert.InRange(by["periodic 30m → random"].MovesPerHour, 1.99, 2.0); // at 30 min, 1 h, …, 7 d − 30 min (the one at the horizon is not done)
        Assert.All(r.Configurations.Where(c => c.Kind != "none"), c => Assert.True(c.BytesPerHour > 0));
    }

    [Theory]
    [InlineData(60, 30)]
    [InlineData(60, 60)]
    [InlineData(60, 120)]
    [InlineData(20, 60)]
    public void Poisson_moves_defeat_an_attack_of_length_t_with_probability_one_minus_e_to_the_minus_lambda_t(int meanMinutes, int attackMinutes)
    {
        // One attacker VM, co-resident from t = 0 (pack placement puts it on the victim's host), and no second try.
        string yaml = $"runs: 3000\nhorizon: 1d\nseed: {meanMinutes * 1000 + attackMinutes}\ncloud: {{hosts: 3, slots: 4, load: 0, placement: pack}}\n" + IdleVictim +
                      $"attacker: {{launch-every: 1m, launch-time: 0s, max-vms: 1, max-launches: 1, attack-time: {attackMinutes}m}}\n" +
                      $"policies: [{{kind: poisson, mean: {meanMinutes}m}}]\n";
        var s = Parse(yaml);
        var r = MtdSweep.Run(s);
        var c = Only(r);
        double d = r.MoveCosts.Single().TotalS; // the co-residency ends when the move completes, D after the decision
        Assert.True(d is > 0 and < 60, $"a move of an idle 256 MiB VM over 10 Gbit/s took {d} s");
        double lambda = 1.0 / (meanMinutes * 60), t = attackMinutes * 60 - d;
        double expected = Math.Exp(-lambda * t); // success: no decision within T − D
        double sd = Math.Sqrt(expected * (1 - expected) / c.Runs);
        Assert.True(Math.Abs(c.SuccessProbability - expected) <= 4 * sd + 0.002,
            $"P(success) {c.SuccessProbability:0.0000}, closed form e^(-λ(T-D)) = {expected:0.0000} (4σ = {4 * sd:0.0000})");
        Assert.Equal(1.0, c.EpisodesPerRun);
    }

    [Fact]
    public void Threat_triggered_moves_with_a_perfect_detector_that_looks_often_enough_give_no_success()
    {
        string yaml = "runs: 100\nhorizon: 3d\ncloud: {hosts: 4, slots: 20, load: 50%}\n" + IdleVictim +
                      "attacker: {launch-every: 2m, launch-time: 1m, max-vms: 3, attack-time: 1h}\n" +
                      "detector: {check-every: 20m, true-positive: 100%, false-positive: 0}\n" +
                      "policies: [none, {kind: threat}]\n";
        var r = MtdSweep.Run(Parse(yaml));
        var threat = r.Configurations.Single(c => c.Kind == "threat");
        Assert.Equal(0, threat.Compromised); // found within 20 min, gone D later: well inside the hour
        Assert.Equal(0, threat.FalseAlarmsPerHour);
        Assert.True(threat.MovesPerHour > 1, $"{threat.MovesPerHour} moves/h"); // one per alarm, and the attacker keeps coming
        Assert.Equal(1.0, r.Configurations.Single(c => c.Kind == "none").SuccessProbability);
    }

    [Fact]
    public void False_alarms_move_the_victim_at_the_false_positive_rate_times_the_looks_per_hour()
    {
        // No attacker within the horizon: every alarm is false, and each moves the victim.
        string yaml = "runs: 50\nhorizon: 7d\ncloud: {hosts: 4}\n" + IdleVictim +
                      "attacker: {start: 30d, attack-time: 1h}\n" +
                      "detector: {check-every: 10m, true-positive: 100%, false-positive: 10%}\n" +
                      "policies: [{kind: threat}]\n";
        var c = Only(MtdSweep.Run(Parse(yaml)));
        double expected = 0.10 * 6; // per hour
        double sd = Math.Sqrt(0.1 * 0.9 * 6 * 24 * 7 * 50) / (24 * 7 * 50);
        Assert.True(Math.Abs(c.FalseAlarmsPerHour - expected) < 4 * sd, $"{c.FalseAlarmsPerHour} false alarms/h, expected {expected}");
        // Each alarm is a decision to move; only a move still under way at the horizon is not counted yet.
        Assert.InRange(c.FalseAlarmsPerHour - (c.MovesPerHour + c.SkippedMovesPerHour), 0, 1.0 / (24 * 7));
        Assert.Equal(0, c.Compromised);
    }

    [Fact]
    public void A_move_costs_what_the_simulator_says_the_migration_of_that_workload_over_that_link_costs()
    {
        const string sim = """
            hosts: [a, b]
            links: [{name: l, bandwidth: 1Gbit, latency: 1ms, between: [a, b]}]
            vms: [{name: v, host: a, memory: 1GiB, vcpus: 2, workload: {rate: 20k, working-set: 256MiB}, content: {zero: 20%, compressible: 50%}}]
            defaults: {downtime-limit: 100ms, compress: lz4}
            migrations: [{vm: v, to: b}]
            """;
        var expected = ScenarioRunner.Run(Scenario.Parse(sim, "sim.yaml")).Migrations.Single();
        var costs = new MoveCostModel(Parse("""
            victim:
              memory: 1GiB
              vcpus: 2
              workload: {rate: 20k, working-set: 256MiB}
              content: {zero: 20%, compressible: 50%}
              migration: {downtime-limit: 100ms, compress: lz4}
            attacker: {attack-time: 1h}
            policies: [none]
            """).Victim, seed: 5);
        var link = new LinkModel(1e9 / 8, TimeSpan.FromMilliseconds(1));
        var cost = costs.Cost(0, link);
        Assert.Equal("completed", cost.Outcome);
        // Other seeds for the page draws: the same migration within a percent or two.
        Assert.Equal(expected.TotalS, cost.TotalS, expected.TotalS * 0.02);
        Assert.Equal(expected.BytesOnWire, cost.Bytes, expected.BytesOnWire * 0.02);
        Assert.InRange(cost.Rounds, expected.Rounds - 1, expected.Rounds + 1);
        Assert.Same(cost, costs.Cost(0, link)); // cached per workload state and link
        var slower = costs.Cost(0, link with { BytesPerSecond = 0.5e9 / 8 });
        Assert.True(slower.TotalS > cost.TotalS * 1.8, $"half the bandwidth: {slower.TotalS} s against {cost.TotalS} s");
        Assert.Equal(2, costs.Simulated);
    }

    private const string DailyCycle = """
        runs: 40
        horizon: 4d
        cloud: {hosts: 8, link: {bandwidth: 10Gbit, latency: 100us}}
        victim:
          memory: 2GiB
          workload:
            rate: 2k
            working-set: 256MiB
            phases:
              - {at: 8h, rate: 80k, working-set: 1GiB}
              - {at: 20h, rate: 2k, working-set: 256MiB}
          cycle: 24h
          content: {zero: 30%, compressible: 40%}
          migration: {downtime-limit: 300ms, on-stall: throttle}
        attacker: {launch-every: 10m, launch-time: 1m, max-vms: 2, attack-time: 3h}
        """;

    [Fact]
    public void The_cost_aware_policy_moves_when_the_dirty_model_makes_the_move_cheap()
    {
        var r = MtdSweep.Run(Parse(DailyCycle + "\npolicies: [{kind: periodic, every: 1h}, {kind: cost-aware, min: 1h, max: 150m, check-every: 5m, by: downtime}]\n"));
        var quiet = r.MoveCosts.Single(m => m.State == 0);
        var busy = r.MoveCosts.Single(m => m.State == 1);
        Assert.True(busy.DowntimeMs > quiet.DowntimeMs * 2 && busy.Bytes > quiet.Bytes && busy.TotalS > quiet.TotalS, $"busy {busy.Bytes} B {busy.DowntimeMs} ms, quiet {quiet.Bytes} B {quiet.DowntimeMs} ms");
        var periodic = r.Configurations.Single(c => c.Kind == "periodic");
        var aware = r.Configurations.Single(c => c.Kind == "cost-aware");
        double PerMove(MtdSummary c) => c.DowntimeMsPerHour / c.MovesPerHour;
        Assert.True(PerMove(aware) < PerMove(periodic) * 0.8, $"downtime per move: cost-aware {PerMove(aware):0.0} ms, periodic {PerMove(periodic):0.0} ms");
        // Half the day is busy: periodic pays the busy price for half its moves, cost-aware for fewer.
        Assert.Equal((quiet.DowntimeMs + busy.DowntimeMs) / 2, PerMove(periodic), (busy.DowntimeMs - quiet.DowntimeMs) * 0.1);
        // Its longest interval (150 min plus the moves' spread) stays under the 3 h attack.
        Assert.Equal(0, aware.Compromised);
    }

    [Fact]
    public void A_sweep_is_deterministic_for_a_seed_and_marks_a_pareto_front()
    {
        string yaml = DailyCycle + "\ndetector: {check-every: 10m, true-positive: 90%, false-positive: 2%}\n" +
                      "policies: [none, {kind: periodic, every: [1h, 2h, 4h], destination: [random, least-loaded]}, {kind: poisson, mean: 1h}, {kind: threat, destination: attacker-aware}]\n";
        var s = Parse(yaml);
        string a = MtdSweep.Run(s).ToJson(), b = MtdSweep.Run(s).ToJson();
        Assert.Equal(a, b);
        Assert.NotEqual(a, MtdSweep.Run(s, seed: 99).ToJson());
        var r = MtdSweep.Run(s);
        Assert.Equal(9, r.Configurations.Count);
        Assert.Contains(r.Configurations, c => c.Pareto);
        Assert.True(r.Configurations.Single(c => c.Kind == "none").Pareto); // nothing costs less
        foreach (var c in r.Configurations.Where(c => c.Pareto))
            Assert.DoesNotContain(r.Configurations, o => o.SuccessProbability < c.SuccessProbability && o.DowntimeMsPerHour < c.DowntimeMsPerHour);
        using var doc = JsonDocument.Parse(a);
        Assert.Equal(24, doc.RootElement.GetProperty("configurations")[0].GetProperty("compromisedBy").GetArrayLength());
    }

    [Fact]
    public void A_recorded_trace_prices_each_move_by_where_its_replay_is_when_the_move_starts()
    {
        string trace = Path.Combine(Repo.Root, "traces", "redis.lmtrace");
        Skip.IfNot(File.Exists(trace), $"{trace} is not there");
        var s = Parse($"runs: 10\nhorizon: 1d\nvictim: {{memory: 256MiB, trace: {trace}, cost-step: 15s, migration: {{compress: lz4}}}}\n" +
                      "attacker: {launch-every: 10m, max-vms: 2, attack-time: 2h}\npolicies: [{kind: periodic, every: 1h}]\n");
        var r = MtdSweep.Run(s);
        double seconds = LiveMig.Traces.TraceFile.Load(trace).End.Duration.TotalSeconds; // about 60 s
        Assert.Equal((int)Math.Ceiling(seconds / 15), r.MoveCosts.Count); // one state per 15 s step of the replay
        Assert.All(r.MoveCosts, m => Assert.Equal("completed", m.Outcome));
        Assert.True(r.MoveCosts.Max(m => m.Bytes) > r.MoveCosts.Min(m => m.Bytes) * 1.2, "the replay's busy and quiet stretches cost differently");
        Assert.Equal(0, Only(r).Compromised);
    }

    [Theory]
    [InlineData("victim: {memory: 1GiB}\nattacker: {attack-time: 1h}\npolicies: [none]\nrunz: 3\n", "test.yaml:4: runz: unknown field (expected one of:")]
    [InlineData("victim: {memory: 1GiB}\nattacker: {attack-time: soon}\npolicies: [none]\n", "test.yaml:2: attacker.attack-time: expected a duration such as 30s, 5ms, 2h or 7d, got 'soon'")]
    [InlineData("victim: {memory: 1GiB}\nattacker: {attack-time: 1h}\npolicies: [{kind: threat}]\n", "test.yaml:3: policies[0].kind: threat moves on the detector's alarms: give a detector")]
    [InlineData("victim: {memory: 1GiB}\nattacker: {attack-time: 1h}\npolicies: [{kind: periodic, every: [1h, never]}]\n", "test.yaml:3: policies[0].every: expected a positive duration such as 30m or 2h, got 'never'")]
    [InlineData("victim: {memory: 1GiB}\nattacker: {attack-time: 1h}\npolicies: [{kind: cost-aware, min: 2h, max: 1h}]\n", "test.yaml:3: policies[0].max: 1h is not longer than min (2h)")]
    [InlineData("victim: {memory: 1GiB, workload: {rate: 1k, wss: 1GiB}}\nattacker: {attack-time: 1h}\npolicies: [none]\n", "test.yaml:1: victim.workload.wss: unknown field")]
    [InlineData("victim: {memory: 1GiB, migration: {strategy: postcopyy}}\nattacker: {attack-time: 1h}\npolicies: [none]\n", "test.yaml:1: victim.migration.strategy: expected precopy, postcopy, hybrid; got 'postcopyy'")]
    [InlineData("cloud: {hosts: 2, slots: 1, load: 50%}\nvictim: {memory: 1GiB}\nattacker: {attack-time: 1h}\npolicies: [none]\n", "test.yaml:1: cloud.load: leaves no slot")]
    [InlineData("victim: {memory: 1GiB}\nattacker: {attack-time: 1h}\npolicies: [{kind: periodic, every: 1h, destination: nearest}]\n", "test.yaml:3: policies[0].destination: expected random, least-loaded, attacker-aware; got 'nearest'")]
    [InlineData("victim: {memory: 1GiB}\npolicies: [none]\n", "test.yaml:1: attacker: missing (required)")]
    public void A_bad_mtd_scenario_is_refused_in_one_line_naming_the_field_and_line(string yaml, string expected)
    {
        var e = Assert.Throws<ScenarioException>(() => Parse(yaml));
        Assert.StartsWith(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void The_example_mtd_scenarios_load_and_run()
    {
        string dir = Path.Combine(Repo.Root, "scenarios");
        Skip.IfNot(Directory.Exists(dir), $"{dir} is not there");
        var files = Directory.GetFiles(dir, "mtd-*.yaml");
        Assert.NotEmpty(files);
        foreach (string f in files)
        {
            var s = MtdScenario.Load(f);
            var r = MtdSweep.Run(s with { Runs = 10 });
            Assert.Equal(s.Policies.Count, r.Configurations.Count);
            Assert.All(r.MoveCosts, m => Assert.Equal("completed", m.Outcome));
            Assert.Contains(r.Configurations, c => c.Pareto);
        }
    }
}
