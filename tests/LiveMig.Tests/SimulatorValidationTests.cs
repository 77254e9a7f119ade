using LiveMig.Memory;
using LiveMig.Simulation;
using LiveMig.Workloads;

namespace LiveMig.Tests;

/// <summary>
/// The simulator's models of the built-in VM (scenario VMs with <c>workload: "random:…"</c>) and
/// <c>livemig validate</c>'s machinery: a real migration over loopback beside its simulation.
/// </summary>
public sealed class SimulatorValidationTests
{
    private const string Small = """
        seed: 5
        hosts: [a, b]
        links:
          - {name: wire, bandwidth: 400Mbit, latency: 0.1ms, between: [a, b]}
        vms:
          - {name: r, host: a, memory: 64MiB, vcpus: 2, workload: "random:rate=3000,range=16MiB", fill: mixed}
        migrations:
          - {vm: r, to: b, at: 300ms}
        """;

    [Fact]
    public void A_built_in_workload_in_a_scenario_is_checked_where_it_is()
    {
        var s = Scenario.Parse(Small);
        Assert.Equal("random:range=16MiB,rate=3000", s.Vms[0].BuiltIn);
        Assert.Equal(LiveMig.Vm.MemoryFill.Mixed, s.Vms[0].Fill);
        Assert.Equal("completed", ScenarioRunner.Run(s).Migrations[0].Outcome);
        Fails(Small.Replace("\"random:rate=3000,range=16MiB\"", "\"kv\""), "vms[0].workload: workload 'kv' is not modelled");
        Fails(Small.Replace("rate=3000,", "rate=0,"), "rate=0 writes as fast as its vCPUs can");
        Fails(Small.Replace("range=16MiB", "range=1GiB"), "must be between one page and the VM's memory");
        Fails(Small.Replace("fill: mixed", "fill: lots"), "vms[0].fill: expected mixed, zero, random");
        Fails(Small.Replace("fill: mixed", "content: {zero: 10%}"), "a built-in workload's content is its fill");
        Fails(Small.Replace("workload: \"random:rate=3000,range=16MiB\", fill: mixed", "workload: {rate: 10}, fill: zero"), "vms[0].fill: only with a built-in workload");
    }

    private static void Fails(string yaml, string expected)
    {
        var e = Assert.Throws<ScenarioException>(() => Scenario.Parse(yaml, "x.yaml"));
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void The_sweep_model_writes_exactly_the_pages_its_positions_pass()
    {
        var sweep = new SweepDirtyProcess(pageCount: 1000, range: 600, vcpus: 2, rate: 200); // slices of 300 pages, 100 pages/s each
        var into = new PageBitmap(1000);
        Assert.Equal(2 * 50, sweep.Write(0, 0.5, into));
        Assert.True(into.IsSet(0) && into.IsSet(49) && !into.IsSet(50) && into.IsSet(300) && into.IsSet(349) && !into.IsSet(350));
        into.ClearAll();
        Assert.Equal(2 * 300, sweep.Write(0.5, 4, into)); // a lap and more: the whole slices
        into.ClearAll();
        Assert.Equal(2 * 100, sweep.Write(2.5, 3.5, into)); // positions 250..349 of a 300-page slice: wraps to 0..49
        Assert.True(into.IsSet(299) && into.IsSet(0) && into.IsSet(49) && !into.IsSet(50));
        Assert.Equal(200 * 3.5, sweep.WritesUpTo(3.5), 6);
    }

    [Fact]
    public void The_hotcold_model_spreads_its_writes_by_the_workloads_Zipf_law()
    {
        // The workload's own sampler (its inverse CDF), counted: the share of distinct pages a number of writes leaves.
        long wss = 20_000, writes = 30_000;
        var rng = new Xoshiro256(9);
        double s = 0.99, n1 = Math.Pow(wss + 1, 1 - s);
        var seen = new HashSet<long>();
        for (int i = 0; i < writes; i++) seen.Add(Math.Clamp((long)Math.Pow(rng.NextDouble() * (n1 - 1) + 1, 1 / (1 - s)) - 1, 0, wss - 1));
        var model = new ZipfDirtyModel(wss, wss, s, rate: writes, seed: 3);
        var into = new PageBitmap(wss);
        long distinct = model.Write(0, 1, into);
        Assert.InRange(distinct, seen.Count * 0.95, seen.Count * 1.05);
        Assert.True(into.IsSet(0), "the hottest rank is written");
    }

    [Fact]
    public void Validate_runs_a_migration_for_real_and_simulated_and_they_agree_loosely()
    {
        var result = ScenarioValidator.Run(Scenario.Parse(Small), "small.yaml", loopback: LoopbackLink.Measure(64L << 20, 50));
        var m = Assert.Single(result.Migrations);
        Assert.Equal("completed", m.Real.Outcome);
        Assert.True(m.Verified);
        Assert.Equal("completed", m.Simulated.Outcome);
        Assert.Equal(400e6 / 8, m.CapBytesPerSecond, 3);
        Assert.True(result.Loopback.BytesPerSecond > m.CapBytesPerSecond, "loopback carries more than the cap");
        // Loose bounds: this checks the machinery (same VM, same cap, same options on both sides), not the accuracy —
        // on a loaded shared machine the real side only ever gets slower (the model has no CPU contention), hence the lopsided time bound.
        string figures = $"real {m.Real}, simulated {m.Simulated}, load {result.LoadBefore}";
        Assert.True(Math.Abs(m.Errors.Bytes!.Value) < 0.15, figures);
        Assert.True(m.Errors.TotalTime!.Value is > -0.6 and < 0.3, figures);
        Assert.True(Math.Abs(m.Simulated.Rounds - m.Real.Rounds) <= 2, figures);
        Assert.Contains("\"realRounds\"", result.ToJson());
    }

    [SkippableTheory]
    [InlineData("postcopy", "")]
    [InlineData("hybrid", ", hybrid-budget: {rounds: 2}")]
    public void Validate_runs_post_copy_and_hybrid_for_real_and_simulated_and_they_agree_loosely(string strategy, string extra)
    {
        var scenario = Scenario.Parse(Small.Replace("{vm: r, to: b, at: 300ms}", $"{{vm: r, to: b, at: 300ms, strategy: {strategy}{extra}}}"));
        var loopback = LoopbackLink.Measure(64L << 20, 50);
        // On a machine loaded enough that loopback itself runs near the cap, the real run's link is not the cap the model is given.
        Skip.If(loopback.BytesPerSecond < 2 * 400e6 / 8, $"loopback measured {Units.Rate(loopback.BytesPerSecond)} on this loaded machine: under twice the 400 Mbit/s cap, the comparison says nothing");
        var result = ScenarioValidator.Run(scenario, "small.yaml", loopback: loopback);
        var m = Assert.Single(result.Migrations);
        Assert.Equal(strategy, m.Strategy);
        Assert.Equal("completed", m.Real.Outcome);
        Assert.True(m.Verified);
        Assert.Equal("completed", m.Simulated.Outcome);
        string figures = $"real {m.Real}, simulated {m.Simulated}, load {result.LoadBefore}";
        // Both switched and both saw faults (the guest writes 3,000 pages/s over 16 MiB while the pages arrive).
        Assert.NotNull(m.Real.Faults);
        Assert.NotNull(m.Simulated.Faults);
        Assert.True(m.Simulated.Faults > 0 && m.Real.Faults > 0, figures);
        // Loose, as above: the machinery, not the accuracy; post-copy's bytes are each page once on both sides.
        Assert.True(Math.Abs(m.Errors.Bytes!.Value) < 0.15, figures);
        Assert.True(m.Errors.TotalTime!.Value is > -0.6 and < 0.3, figures);
    }

    [Fact]
    public void Validate_refuses_what_it_cannot_run_for_real()
    {
        var hand = Scenario.Parse(Small.Replace("workload: \"random:rate=3000,range=16MiB\", fill: mixed", "workload: {rate: 10}"));
        Assert.Contains("validate runs built-in VMs only", Assert.Throws<ScenarioException>(() => ScenarioValidator.Check(hand, "x.yaml")).Message);
        var evacuate = Scenario.Parse(Small.Replace("migrations:\n  - {vm: r, to: b, at: 300ms}", "evacuate: {host: a, to: [b]}"));
        Assert.Contains("not evacuate", Assert.Throws<ScenarioException>(() => ScenarioValidator.Check(evacuate, "x.yaml")).Message);
    }
}
