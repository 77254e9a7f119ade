using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Simulation;

namespace LiveMig.Tests;

/// <summary>
/// Simulated post-copy and hybrid (the engine's HybridPolicy and PrepagingOrder on the virtual
/// clock) against closed forms: with no dirtying post-copy takes its memory over the bandwidth
/// plus the switch, and its downtime is the switch alone (what the memory adds is only the
/// pending bitmap); each page goes once, so its bytes do not grow with the dirty rate while
/// pre-copy's do, hybrid's lying between; faults cost at least a round trip and a page each.
/// </summary>
public sealed class SimulatorPostCopyTests
{
    private const long Pages1GiB = 1L << 30 >> 12;
    private const double Gbit = 125e6;
    private static readonly TimeSpan Latency = TimeSpan.FromMilliseconds(0.5); // one way: a round trip of 1 ms
    private const double Rtt = 1e-3;
    private const long State = 64 << 10;
    private static readonly SimHost A = new("a"), B = new("b");

    private static SimMigrationResult Run(long pages, SimMigrationOptions options, IDirtyProcess? dirty = null, int vcpus = 1, SimVm[]? keep = null, ReadModel? reads = null)
    {
        var s = new EventScheduler();
        var net = new FlowNetwork(s);
        var route = new SimRoute(A, B, [new SimLink("ab", Gbit, Latency)]);
        var vm = new SimVm("vm", A, pages, vcpus, dirty ?? DirtyModel.Constant(pages, 0), new ContentMixModel(new ContentShares()), State, s.Clock).WithReads(reads, 99);
        var m = new SimMigration(s, net, vm, route, options) { RecordPhases = true };
        s.At(0, m.Start);
        s.Run(until: EventScheduler.Nanoseconds(TimeSpan.FromHours(1)), maxEvents: 50_000_000);
        Assert.NotNull(m.Result);
        Assert.Equal("completed", m.Result!.Outcome);
        Assert.Equal(B, vm.Host);
        Assert.False(vm.Migrating);
        if (keep is not null) keep[0] = vm;
        return m.Result;
    }

    private static readonly SimMigrationOptions PostCopy = new() { Strategy = MigrationStrategy.PostCopy };
    private static readonly SimMigrationOptions Hybrid = new() { Strategy = MigrationStrategy.Hybrid };

    /// <summary>The switch's bytes: PostCopyStart, the pending bitmap in 60 KiB frames, the VM state in 60 KiB frames.</summary>
    private static double SwitchBytes(long pages)
    {
        long words = (pages + 63) / 64;
        return 16 + 48 + words * 8 + (words + 7679) / 7680 * (16 + 12) + State + (State + (60 << 10) - 1) / (60 << 10) * 16;
    }

    /// <summary>Wire bytes of n raw pages: entry header and page each, and a batch's framing per MiB.</summary>
    private static double RawBytes(long pages)
    {
        double entries = pages * 4104.0;
        return entries + Math.Ceiling(entries / (1 << 20)) * 24;
    }

    [Fact]
    public void Reads_of_pages_not_yet_pushed_fault_at_half_the_read_rate_times_the_push_time()
    {
        // Pure post-copy in address order (no prepaging), a guest (one vCPU) that only reads, uniformly
        // over all its memory at r pages/s of its work: page p arrives at about p/N of the push's time
        // T, so a read faults while a share u = 1 − t/T of the pages is still pending; each fault stalls
        // the vCPU for its latency L (a round trip and a page), so the guest works at 1/(1 + r·L·u) and
        // faults at r·u/(1 + r·L·u): in all T·∫₀¹ r·u/(1 + a·u) du = T·(r/a²)·(a − ln(1 + a)), a = r·L
        // (r·T/2 without the stalls). Each page is read at most about once: r·T ≪ N.
        const double r = 200;
        var options = PostCopy with { PostCopy = new PostCopyOptions { Prepaging = new PrepagingOptions { Enabled = false } } };
        var idle = Run(Pages1GiB, options);
        Assert.Equal(0, idle.PagesRequested);
        var reading = Run(Pages1GiB, options, reads: new ReadModel(r, Pages1GiB));
        double push = reading.PostCopyMs / 1000, a = r * reading.FaultLatencyUs!.P50 / 1e6;
        double expected = push * r / (a * a) * (a - Math.Log(1 + a));
        Assert.InRange(reading.PagesRequested, expected * 0.9, expected * 1.1); // the draws' noise: √750 ≈ 4%
        Assert.True(reading.PagesRequested < r * push / 2 * 0.95, "the stalls slow the reads");
        // Every page still goes once: the faults' pages are not pushed again.
        Assert.Equal(idle.PagesPushed, reading.PagesPushed + reading.PagesRequested);
        Assert.True(reading.FaultLatencyUs.P50 >= Rtt * 1e6, $"a fault costs at least a round trip: {reading.FaultLatencyUs.P50} µs");
        // Reads cost nothing before the switch: pre-copy's time and bytes are as without them.
        var pre = Run(Pages1GiB, new SimMigrationOptions());
        var preReading = Run(Pages1GiB, new SimMigrationOptions(), reads: new ReadModel(r, Pages1GiB));
        Assert.Equal(pre.TotalS, preReading.TotalS);
        Assert.Equal(pre.BytesOnWire, preReading.BytesOnWire);
    }

    [Fact]
    public void Post_copy_with_no_dirtying_takes_the_memory_over_the_bandwidth_plus_the_switch()
    {
        var r = Run(Pages1GiB, PostCopy);
        double switchCost = SwitchBytes(Pages1GiB) / Gbit + 2 * Rtt;
        Assert.Equal(switchCost * 1000, r.DowntimeMs, 3);
        // Hello and Attach, the provisioning Sync, the switch, the push, PostCopyEnd → Done.
        double total = 3 * Rtt + switchCost + RawBytes(Pages1GiB) / Gbit + Rtt;
        Assert.Equal(total, r.TotalS, 3);
        Assert.Equal(SwitchBytes(Pages1GiB) + RawBytes(Pages1GiB), r.BytesOnWire, 1000.0);
        Assert.Equal(0, r.Rounds);
        Assert.Equal("immediate", r.StopReason);
        Assert.Equal(Pages1GiB, r.PagesAtSwitch);
        Assert.Equal(Pages1GiB, r.PagesPushed);
        Assert.Equal(0, r.PagesRequested);
        Assert.Equal(["handshake", "downtime", "post-copy"], r.Phases!.Select(p => p.Kind));
    }

    [Fact]
    public void Post_copy_downtime_is_the_switch_whatever_the_memory_size()
    {
        var one = Run(Pages1GiB, PostCopy);
        var four = Run(4 * Pages1GiB, PostCopy);
        // Only the pending bitmap grows with memory (a bit a page): 96 KiB more for 3 GiB more.
        double bitmap = (SwitchBytes(4 * Pages1GiB) - SwitchBytes(Pages1GiB)) / Gbit;
        Assert.Equal(bitmap * 1000, four.DowntimeMs - one.DowntimeMs, 3);
        Assert.True(four.DowntimeMs < 4, $"downtime {four.DowntimeMs} ms");
        Assert.Equal(4, four.TotalS / one.TotalS, 1);
        // Pre-copy's stop-and-copy of the same idle VM: the state and two round trips, no bitmap.
        var pre = Run(Pages1GiB, new SimMigrationOptions());
        Assert.Equal((State / Gbit + 2 * Rtt) * 1000, pre.DowntimeMs, 3);
    }

    [Fact]
    public void Post_copy_bytes_do_not_grow_with_the_dirty_rate_pre_copys_do_and_hybrids_lie_between()
    {
        long ws = Pages1GiB / 4;
        double pageRate = Gbit / 4104;
        var pre = new List<long>();
        var post = new List<long>();
        var hybrid = new List<long>();
        foreach (double share in new[] { 0.0, 0.1, 0.3, 0.6 })
        {
            DirtyModel Dirty() => DirtyModel.Constant(Pages1GiB, share * pageRate, ws, seed: 5);
            pre.Add(Run(Pages1GiB, new SimMigrationOptions { PreCopy = new PreCopyOptions { OnStall = StallAction.Throttle, AutoConverge = new AutoConvergeOptions() } }, Dirty()).BytesOnWire);
            post.Add(Run(Pages1GiB, PostCopy, Dirty()).BytesOnWire);
            hybrid.Add(Run(Pages1GiB, Hybrid with { PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 2 } } }, Dirty()).BytesOnWire);
        }
        // Each page once: the same bytes at every rate (the memory and the switch; a requested page only adds its batch's framing).
        Assert.All(post, b => Assert.Equal(post[0], b, 0.001 * post[0]));
        Assert.Equal(SwitchBytes(Pages1GiB) + RawBytes(Pages1GiB), post[0], 1000.0);
        for (int i = 1; i < pre.Count; i++) Assert.True(pre[i] > pre[i - 1], $"pre-copy bytes {string.Join(", ", pre)}");
        // Hybrid: its two rounds, then each remaining page once. Where pre-copy converges within two rounds too, the two
        // differ only by the switch's pending bitmap; where it needs more, hybrid sends less.
        string all = $"post {string.Join(", ", post)}; hybrid {string.Join(", ", hybrid)}; pre {string.Join(", ", pre)}";
        for (int i = 1; i < pre.Count; i++)
        {
            Assert.True(post[i] < hybrid[i] && hybrid[i] <= pre[i] + SwitchBytes(Pages1GiB), all);
            if (i >= 2) Assert.True(hybrid[i] < pre[i], all);
        }
    }

    [Fact]
    public void A_page_the_guest_writes_before_it_arrives_is_a_fault_costing_a_round_trip_and_a_page()
    {
        var keep = new SimVm[1];
        // 20,000 writes/s on a 64 MiB working set with a hot tenth: the guest touches many pages before the push reaches them.
        var dirty = new DirtyModel(Pages1GiB, [new DirtyPhase(0, 20_000, (64L << 20) / 4096, 0.1, 0.8)], seed: 3);
        var r = Run(Pages1GiB, PostCopy, dirty, vcpus: 2, keep: keep);
        Assert.True(r.PagesRequested > 100, $"{r.PagesRequested} faults");
        Assert.Equal(r.PagesAtSwitch, r.PagesPushed + r.PagesRequested);
        Assert.True(r.PagesPrepaged > 0, "the engine's prepaging order pushed a fault's neighbours first");
        double floorUs = (Rtt + 4104 / Gbit) * 1e6;
        Assert.True(r.FaultLatencyUs!.P50 >= floorUs * 0.999, $"p50 {r.FaultLatencyUs.P50} µs");
        Assert.True(r.FaultLatencyUs.Max >= r.FaultLatencyUs.P99 && r.FaultLatencyUs.P99 >= r.FaultLatencyUs.P50);
        Assert.True(r.FaultWaitMs >= r.PagesRequested * floorUs / 1000 * 0.999, $"waited {r.FaultWaitMs} ms");
        // The guest's vCPUs waited that long between them: its progress stalled by the wait ÷ vCPUs.
        Assert.Equal(r.FaultWaitMs / 2 / 1000, keep[0].Guest.StalledSeconds, 6);
        // Faults add requested pages' bytes, not pages: the bytes are still each page once.
        Assert.Equal(SwitchBytes(Pages1GiB) + RawBytes(Pages1GiB), r.BytesOnWire, 0.001 * r.BytesOnWire);
        Assert.True(r.PostCopyMs > 0 && r.TotalS * 1000 > r.PostCopyMs + r.DowntimeMs);
    }

    [Fact]
    public void Hybrid_runs_the_rounds_of_the_engines_hybrid_policy_then_switches()
    {
        double pageRate = Gbit / 4104;
        var dirty = DirtyModel.Constant(Pages1GiB, 2 * pageRate, Pages1GiB / 8, seed: 2); // never converges
        var r = Run(Pages1GiB, Hybrid with { PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 3 } } }, dirty);
        Assert.True(r.SwitchedToPostCopy);
        Assert.Equal(3, r.Rounds);
        Assert.Equal("round-budget", r.StopReason);
        Assert.Equal(["handshake", "round", "round", "round", "downtime", "post-copy"], r.Phases!.Select(p => p.Kind));
        Assert.True(r.PagesAtSwitch > 0 && r.PagesAtSwitch <= Pages1GiB / 8);
        // No round budget at all: pure post-copy, as the engine (HybridPolicy.SwitchesAtOnce).
        var none = Run(Pages1GiB, Hybrid with { PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 0 } } });
        Assert.Equal(0, none.Rounds);
        Assert.Equal("round-budget", none.StopReason);
        Assert.Equal(Pages1GiB, none.PagesAtSwitch);
    }

    [Fact]
    public void A_scenario_of_every_strategy_is_the_same_for_a_seed_and_differs_for_another()
    {
        const string yaml = """
            hosts: [a, b]
            links: [{name: ab, bandwidth: 1Gbit, latency: 0.2ms, between: [a, b]}]
            vms:
              - {name: v, host: a, memory: 256MiB, vcpus: 2, workload: {rate: 30k, working-set: 64MiB, hot-set: 10%, hot-writes: 80%}}
            migrations:
              - {vm: v, to: b, at: 0s, strategy: postcopy}
              - {vm: v, to: a, at: 10s, strategy: hybrid, hybrid-budget: {rounds: 2}}
              - {vm: v, to: b, at: 20s, on-stall: postcopy, downtime-limit: 5ms}
            """;
        string Json(ulong seed) => ScenarioRunner.Run(Scenario.Parse(yaml), seed).ToJson();
        Assert.Equal(Json(4), Json(4));
        Assert.NotEqual(Json(4), Json(5));
        var r = ScenarioRunner.Run(Scenario.Parse(yaml), 4);
        Assert.Equal(["postcopy", "hybrid", "precopy"], r.Migrations.Select(m => m.Strategy));
        Assert.All(r.Migrations, m => Assert.True(m.SwitchedToPostCopy && m.Outcome == "completed" && m.PagesRequested > 0, $"{m.Strategy}: {m.Outcome}, {m.PagesRequested} faults"));
    }
}
