using System.Diagnostics;
using LiveMig.Core;
using LiveMig.Memory;
using LiveMig.Policies;
using LiveMig.Simulation;

namespace LiveMig.Tests;

/// <summary>
/// The round controller without the mechanism: a virtual clock, a modelled link and a modelled
/// guest, checked against the closed forms of pre-copy (Clark et al. 2005): with no dirtying one
/// round of memory ÷ bandwidth and an empty stop-and-copy; with a constant dirty rate r below the
/// page bandwidth B every round is r/B of the one before, until the rest fits in the downtime limit.
/// </summary>
public sealed class RoundControllerTests
{
    private const long Pages64GiB = 64L << 30 >> 12;
    private const double BytesPerPage = 4104; // a raw page and its entry header
    private const double LinkBytesPerSecond = 1.25e9; // 10 Gbit/s

    private static (RoundController Controller, VirtualClock Clock, ModelLink Link, ModelGuest Guest) Model(
        long pages, double dirtyRate, PreCopyOptions? options = null, TimeSpan latency = default, ulong seed = 1)
    {
        var clock = new VirtualClock();
        var link = new ModelLink(clock, LinkBytesPerSecond, latency, BytesPerPage);
        var guest = new ModelGuest(clock, pages, dirtyRate, seed: seed);
        var policy = new PreCopyPolicy(options ?? new PreCopyOptions { MaxRounds = 100 }, clock);
        return (new RoundController(policy, link, guest, guest, clock), clock, link, guest);
    }

    private static PageBitmap All(long pages)
    {
        var b = new PageBitmap(pages);
        b.SetRange(0, pages);
        return b;
    }

    [Fact]
    public void No_dirtying_is_one_round_of_memory_over_bandwidth_then_an_empty_stop_and_copy()
    {
        var wall = Stopwatch.StartNew();
        var (c, clock, _, guest) = Model(Pages64GiB, dirtyRate: 0);
        guest.Start();
        c.Begin(All(Pages64GiB));
        var decision = c.RunLiveRounds(CancellationToken.None);

        Assert.Equal(StopReason.DowntimeTarget, decision.Reason);
        var round0 = Assert.Single(c.Rounds);
        double expected = Pages64GiB * BytesPerPage / LinkBytesPerSecond; // 56.4 s
        Assert.Equal(expected, round0.DurationMs / 1000, 3);
        Assert.Equal(Pages64GiB, round0.PagesSent);
        Assert.Equal(0, round0.PagesDirtied);
        Assert.Equal(0, c.HarvestFinal());
        var final = c.SendFinalRound(0);
        Assert.Equal(0, final.PagesSent);
        Assert.Equal(expected, clock.Elapsed.TotalSeconds, 3);
        // A bound, not a speed check (speed is bench/simgrid's): the model walks no pages one by one.
        Assert.True(wall.Elapsed < TimeSpan.FromSeconds(20), $"a 64 GiB model migration took {wall.Elapsed.TotalMilliseconds:0} ms of wall time");
    }

    [Fact]
    public void Constant_dirty_rate_below_bandwidth_shrinks_each_round_by_r_over_b_until_the_rest_fits_the_downtime_limit()
    {
        var wall = Stopwatch.StartNew();
        double pageBandwidth = LinkBytesPerSecond / BytesPerPage; // B ≈ 304,581 pages/s
        double rate = pageBandwidth / 4;                            // r/B = 1/4
        var limit = TimeSpan.FromMilliseconds(300);
        var (c, clock, _, guest) = Model(Pages64GiB, rate, new PreCopyOptions { DowntimeLimit = limit, MaxRounds = 100 });
        guest.Start();
        c.Begin(All(Pages64GiB));
        var decision = c.RunLiveRounds(CancellationToken.None);

        Assert.Equal(StopReason.DowntimeTarget, decision.Reason);
        var rounds = c.Rounds;
        // Round k sends N (r/B)^k pages; round k leaves N (r/B)^(k+1) pending. It stops after the
        // first round that leaves at most limit × B pages: N/4^(k+1) ≤ 0.3 s × B → k = 3 for 64 GiB.
        Assert.Equal(4, rounds.Count);
        double expectedPages = Pages64GiB;
        foreach (var r in rounds)
        {
            Assert.InRange(r.PagesSent, expectedPages * 0.999 - 1, expectedPages * 1.001 + 1);
            Assert.Equal(r.DurationMs / 1000, r.PagesSent / pageBandwidth, 4);
            expectedPages /= 4;
            Assert.InRange(r.PagesDirtied, expectedPages * 0.999 - 1, expectedPages * 1.001 + 1);
        }
        long pending = rounds[^1].PagesDirtied;
        Assert.True(pending / pageBandwidth <= limit.TotalSeconds);
        Assert.True(rounds[^2].PagesDirtied / pageBandwidth > limit.TotalSeconds, "one round earlier the rest did not fit yet");
        // The policy's estimate is the closed form too: pending pages at the page bandwidth (no latency, no fixed cost here).
        Assert.Equal(pending / pageBandwidth * 1000, rounds[^1].EstimatedDowntimeMs, 1);
        // Total live time: N/B × (1 + 1/4 + 1/16 + 1/64).
        Assert.Equal(Pages64GiB / pageBandwidth * (1 + 0.25 + 0.0625 + 0.015625), clock.Elapsed.TotalSeconds, 2);

        long final = c.HarvestFinal();
        Assert.Equal(pending, final);
        // A bound, not a speed check (speed is bench/simgrid's): the model walks no pages one by one.
        Assert.True(wall.Elapsed < TimeSpan.FromSeconds(20), $"a 64 GiB model migration took {wall.Elapsed.TotalMilliseconds:0} ms of wall time");
    }

    [Fact]
    public void The_downtime_estimate_counts_the_switch_over_round_trips()
    {
        // 5 ms one way: every Sync costs 10 ms, the switch-over's two round trips 20 ms.
        var (c, _, link, guest) = Model(1 << 16, dirtyRate: 20_000, new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50), MaxRounds = 100 }, latency: TimeSpan.FromMilliseconds(5));
        guest.Start();
        c.Begin(All(1 << 16));
        c.RunLiveRounds(CancellationToken.None);
        var last = c.Rounds[^1];
        double bandwidthPages = c.Rounds.Sum(r => r.BytesSent) / (c.Rounds.Sum(r => r.DurationMs) / 1000) / BytesPerPage;
        Assert.Equal(last.PagesDirtied / bandwidthPages * 1000 + link.SwitchoverCost.TotalMilliseconds, last.EstimatedDowntimeMs, 1);
        Assert.True(last.EstimatedDowntimeMs <= 50);
    }

    [Fact]
    public void A_guest_faster_than_the_link_does_not_converge_and_auto_converge_throttles_it_until_it_does()
    {
        double pageBandwidth = LinkBytesPerSecond / BytesPerPage;
        var options = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(300), MaxRounds = 100 };
        var (plain, _, _, g1) = Model(1 << 22, pageBandwidth * 1.5, options);
        g1.Start();
        plain.Begin(All(1 << 22));
        Assert.Equal(StopReason.NonConvergence, plain.RunLiveRounds(CancellationToken.None).Reason);
        Assert.Equal(0, plain.MaxThrottle);

        var (helped, _, _, g2) = Model(1 << 22, pageBandwidth * 1.5, options with { AutoConverge = new AutoConvergeOptions() });
        g2.Start();
        helped.Begin(All(1 << 22));
        Assert.Equal(StopReason.DowntimeTarget, helped.RunLiveRounds(CancellationToken.None).Reason);
        Assert.True(helped.MaxThrottle >= 0.5, $"throttle {helped.MaxThrottle}");
        helped.ReleaseBrakes();
        Assert.Equal(0, g2.ThrottleFraction);
    }

    [Fact]
    public void The_time_budget_counts_from_the_start_of_the_rounds_not_from_when_the_policy_was_made()
    {
        var clock = new VirtualClock();
        var link = new ModelLink(clock, LinkBytesPerSecond, TimeSpan.Zero, BytesPerPage);
        var guest = new ModelGuest(clock, 1 << 20, 300_000); // about the page bandwidth: never converges on its own
        var policy = new PreCopyPolicy(new PreCopyOptions { TimeBudget = TimeSpan.FromSeconds(10), MaxRounds = 1000, NonConvergenceRounds = 1000 }, clock);
        clock.Advance(TimeSpan.FromMinutes(5)); // the policy waited a long time before the migration began
        var c = new RoundController(policy, link, guest, guest, clock);
        guest.Start();
        long started = clock.GetTimestamp();
        c.Begin(All(1 << 20));
        var decision = c.RunLiveRounds(CancellationToken.None);
        Assert.Equal(StopReason.TimeBudget, decision.Reason);
        Assert.True(c.Rounds.Count > 1);
        Assert.InRange(clock.GetElapsedTime(started).TotalSeconds, 10, 10 + c.Rounds[^1].DurationMs / 1000 + 1e-6);
    }

    [Theory]
    [InlineData(StallAction.Abort, RoundsEnding.Abort, 0.0)]
    [InlineData(StallAction.Throttle, RoundsEnding.Abort, 0.99)]
    [InlineData(StallAction.PostCopy, RoundsEnding.PostCopy, 0.0)]
    public void A_stall_ends_the_rounds_as_on_stall_says_and_throttle_gives_up_only_once_no_brake_is_left(StallAction onStall, RoundsEnding ending, double throttle)
    {
        double pageBandwidth = LinkBytesPerSecond / BytesPerPage;
        // 1000 × the link: even at 99% the guest writes ten times what the link carries.
        var options = new PreCopyOptions { MaxRounds = 200, OnStall = onStall, AutoConverge = onStall == StallAction.Throttle ? new AutoConvergeOptions { TriggerRounds = 1 } : null };
        var (c, _, _, guest) = Model(1 << 20, pageBandwidth * 1000, options);
        guest.Start();
        c.Begin(All(1 << 20));
        var d = c.RunLiveRounds(CancellationToken.None);
        Assert.True(d.StopAndCopy && d.Stalled);
        Assert.Equal(ending, d.Ending);
        Assert.Equal(throttle, c.MaxThrottle, 6);
        Assert.Equal(throttle > 0, c.Escalations.Any(l => l.Contains("vCPU throttle 99%")));
    }

    [Fact]
    public void A_stall_with_on_stall_pause_stops_and_copies_only_within_the_maximum_downtime()
    {
        double pageBandwidth = LinkBytesPerSecond / BytesPerPage;
        // 10% of the memory stays dirty: a stop-and-copy of 1/10 of 2^20 pages takes about 344 ms.
        var writable = (First: 0L, Count: 1L << 17);
        foreach (var (max, ending) in new[] { (TimeSpan.FromSeconds(1), RoundsEnding.StopAndCopy), (TimeSpan.FromMilliseconds(320), RoundsEnding.Abort) })
        {
            var clock = new VirtualClock();
            var link = new ModelLink(clock, LinkBytesPerSecond, TimeSpan.Zero, BytesPerPage);
            var guest = new ModelGuest(clock, 1 << 20, pageBandwidth * 2, writable: writable);
            var policy = new PreCopyPolicy(new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(300) }.PauseOnStall(max), clock);
            var c = new RoundController(policy, link, guest, guest, clock);
            guest.Start();
            c.Begin(All(1 << 20));
            var d = c.RunLiveRounds(CancellationToken.None);
            Assert.True(d.Stalled);
            Assert.InRange(d.EstimatedDowntime.TotalMilliseconds, 320, 1000);
            Assert.Equal(ending, d.Ending);
        }
    }

    [Fact]
    public void A_model_migration_is_deterministic_for_a_seed()
    {
        static string Run(ulong seed)
        {
            var (c, clock, _, guest) = Model(1 << 20, 100_000, new PreCopyOptions { DeferHotPages = true, MaxRounds = 100 }, seed: seed);
            guest.Start();
            c.Begin(All(1 << 20));
            c.RunLiveRounds(CancellationToken.None);
            return string.Join(";", c.Rounds.Select(r => $"{r.PagesSent},{r.PagesDirtied},{r.PagesDeferred},{r.DurationMs:F6}")) + $"@{clock.Elapsed.Ticks}";
        }
        Assert.Equal(Run(7), Run(7));
    }
}
