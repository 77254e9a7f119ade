using LiveMig.Simulation;

namespace LiveMig.Tests;

/// <summary>
/// The simulator's discrete-event core and its network: flows share links max-min fairly, checked
/// against closed forms in virtual time (a flow alone takes size ÷ bandwidth; two equal flows on
/// one link get half each; a flow that ends gives its share back; a flow held back elsewhere
/// leaves its share to the others).
/// </summary>
public sealed class SimulatorNetworkTests
{
    private static readonly SimHost A = new("a"), B = new("b"), C = new("c");

    private static (EventScheduler S, FlowNetwork Net) New()
    {
        var s = new EventScheduler();
        return (s, new FlowNetwork(s));
    }

    private static SimRoute Route(params SimLink[] links) => new(A, B, links);

    [Fact]
    public void Events_run_in_time_order_and_ties_in_the_order_queued()
    {
        var s = new EventScheduler();
        var seen = new List<string>();
        s.AfterSeconds(2, () => seen.Add("2s"));
        s.AfterSeconds(1, () => { seen.Add("1s"); s.AfterSeconds(0, () => seen.Add("1s+0")); });
        s.AfterSeconds(1, () => seen.Add("1s second"));
        s.Run();
        Assert.Equal(["1s", "1s second", "1s+0", "2s"], seen);
        Assert.Equal(2.0, s.NowSeconds, 9);
        Assert.Equal(4, s.EventsRun);
    }

    [Fact]
    public void The_event_loop_is_bounded()
    {
        var s = new EventScheduler();
        void Again() => s.AfterSeconds(1, Again);
        Again();
        Assert.Equal(1000, s.Run(maxEvents: 1000));
        Assert.Equal(1, s.Pending);
    }

    [Fact]
    public void A_flow_alone_takes_its_size_over_the_bandwidth()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 125e6, TimeSpan.FromMilliseconds(1));
        var f = net.Start(Route(link), 2L << 30, _ => { });
        s.Run();
        Assert.Equal((2L << 30) / 125e6, f.FinishedAt / 1e9, 6);
        Assert.Equal(2L << 30, link.BytesCarried, 0);
        Assert.Equal(0, net.ActiveFlows);
    }

    [Fact]
    public void Two_equal_flows_on_one_link_get_half_each()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 100e6, TimeSpan.Zero);
        var f1 = net.Start(Route(link), 1e9, _ => { });
        var f2 = net.Start(Route(link), 1e9, _ => { });
        s.Run(until: 1_000_000_000);
        Assert.Equal(50e6, f1.Rate, 3);
        Assert.Equal(50e6, f2.Rate, 3);
        s.Run();
        // Each at half the link: 2 × 1 GB ÷ 100 MB/s.
        Assert.Equal(20.0, f1.FinishedAt / 1e9, 6);
        Assert.Equal(20.0, f2.FinishedAt / 1e9, 6);
    }

    [Fact]
    public void A_flow_that_ends_gives_its_share_back()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 100e6, TimeSpan.Zero);
        var small = net.Start(Route(link), 1e9, _ => { });
        var large = net.Start(Route(link), 2e9, _ => { });
        s.Run();
        // Both at 50 MB/s until the small one is done (20 s, 1 GB each); the large one's last 1 GB at 100 MB/s.
        Assert.Equal(20.0, small.FinishedAt / 1e9, 6);
        Assert.Equal(30.0, large.FinishedAt / 1e9, 6);
    }

    [Fact]
    public void A_flow_that_joins_later_slows_the_first_from_then_on()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 100e6, TimeSpan.Zero);
        var first = net.Start(Route(link), 1e9, _ => { });
        Flow? second = null;
        s.AfterSeconds(5, () => second = net.Start(Route(link), 0.25e9, _ => { }));
        s.Run();
        // 0.5 GB alone in 5 s; then both at 50 MB/s: the second's 0.25 GB take 5 s; the first's last 0.25 GB alone 2.5 s.
        Assert.Equal(10.0, second!.FinishedAt / 1e9, 6);
        Assert.Equal(12.5, first.FinishedAt / 1e9, 6);
    }

    [Fact]
    public void A_flow_held_back_by_a_narrower_link_leaves_its_share_to_the_others()
    {
        var (s, net) = New();
        var shared = new SimLink("core", 100e6, TimeSpan.Zero);
        var narrow = new SimLink("edge", 20e6, TimeSpan.Zero);
        var wide = net.Start(new SimRoute(A, B, [shared]), 1e9, _ => { });
        var held = net.Start(new SimRoute(A, C, [shared, narrow]), 1e9, _ => { });
        s.Run(until: 1);
        Assert.Equal(20e6, held.Rate, 3);
        Assert.Equal(80e6, wide.Rate, 3);
    }

    [Fact]
    public void A_capped_flow_takes_its_cap_and_the_others_share_the_rest()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 100e6, TimeSpan.Zero);
        var capped = net.Start(Route(link), 1e9, _ => { }, cap: 10e6);
        var free1 = net.Start(Route(link), 1e9, _ => { });
        var free2 = net.Start(Route(link), 1e9, _ => { });
        s.Run(until: 1);
        Assert.Equal(10e6, capped.Rate, 3);
        Assert.Equal(45e6, free1.Rate, 3);
        Assert.Equal(45e6, free2.Rate, 3);
        // A cap above the fair share does not bind.
        var (s2, net2) = New();
        var l2 = new SimLink("ab", 100e6, TimeSpan.Zero);
        var loose = net2.Start(Route(l2), 1e9, _ => { }, cap: 80e6);
        var other = net2.Start(Route(l2), 1e9, _ => { });
        s2.Run(until: 1);
        Assert.Equal(50e6, loose.Rate, 3);
        Assert.Equal(50e6, other.Rate, 3);
    }

    [Fact]
    public void A_flow_started_from_a_completion_callback_runs_at_once_and_an_empty_flow_completes_now()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 100e6, TimeSpan.Zero);
        Flow? next = null;
        net.Start(Route(link), 100e6, _ => next = net.Start(Route(link), 200e6, _ => { }));
        var empty = net.Start(Route(link), 0, _ => { });
        s.Run();
        Assert.Equal(0, empty.FinishedAt);
        Assert.Equal(3.0, next!.FinishedAt / 1e9, 6);
    }

    [Fact]
    public void Many_concurrent_flows_share_a_link_equally_and_finish_together()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 1e9, TimeSpan.Zero);
        var flows = Enumerable.Range(0, 1000).Select(_ => net.Start(Route(link), 1e6, _ => { })).ToList();
        s.Run();
        // 1000 × 1 MB over 1 GB/s: 1 s, all together.
        Assert.All(flows, f => Assert.Equal(1.0, f.FinishedAt / 1e9, 6));
        Assert.True(net.Allocations <= 3, $"{net.Allocations} allocations: flows started in one instant should share one");
    }

    [Fact]
    public void Flows_on_one_route_are_shared_as_a_group_and_finish_in_order_of_size()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 1e9, TimeSpan.Zero);
        var route = Route(link);
        var flows = new[] { 3e9, 1e9, 2e9 }.Select(b => net.Start(route, b, _ => { })).ToList();
        s.Run(until: 1);
        Assert.All(flows, f => Assert.Equal(1e9 / 3, f.Rate, 3));
        s.Run();
        // A third each until the 1 GB one is done (3 s), half each until the 2 GB one is (5 s), then the last alone (6 s).
        Assert.Equal(6.0, flows[0].FinishedAt / 1e9, 6);
        Assert.Equal(3.0, flows[1].FinishedAt / 1e9, 6);
        Assert.Equal(5.0, flows[2].FinishedAt / 1e9, 6);
        Assert.Equal(6e9, link.BytesCarried, 0);
    }

    [Fact]
    public void Ten_thousand_flows_on_one_route_cost_one_allocation_per_change_not_per_flow()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 1e9, TimeSpan.Zero);
        var route = Route(link);
        var flows = Enumerable.Range(0, 10_000).Select(i => net.Start(route, 1e5 * (1 + i % 4), _ => { })).ToList();
        s.Run();
        // Sizes 100, 200, 300, 400 kB, 2,500 of each: the four sizes end at 1, 1.75, 2.25 and 2.5 s.
        double[] ends = [1.0, 1.75, 2.25, 2.5];
        for (int i = 0; i < 8; i++) Assert.Equal(ends[i % 4], flows[i].FinishedAt / 1e9, 6);
        Assert.True(net.Allocations <= 10, $"{net.Allocations} allocations");
    }

    [Fact]
    public void A_completion_superseded_by_faster_rates_does_not_stretch_the_simulation()
    {
        var (s, net) = New();
        var link = new SimLink("ab", 1e9, TimeSpan.Zero);
        var large = net.Start(Route(link), 2e9, _ => { });
        net.Start(Route(link), 1e9, _ => { });
        s.Run();
        // Half each until the small one ends (2 s), then the large one's last 1 GB alone (3 s); its
        // completion as first foreseen (at half rate, 4 s) must not move the clock.
        Assert.Equal(3.0, large.FinishedAt / 1e9, 6);
        Assert.Equal(3.0, s.NowSeconds, 6);
        Assert.Equal(0, s.Pending);
    }

    [Fact]
    public void A_cancelled_event_does_not_run()
    {
        var s = new EventScheduler();
        bool ran = false;
        long id = s.AfterSeconds(5, () => ran = true);
        s.AfterSeconds(1, () => { });
        s.Cancel(id);
        Assert.Equal(1, s.Pending);
        s.Run();
        Assert.False(ran);
        Assert.Equal(1.0, s.NowSeconds, 9);
    }
}
