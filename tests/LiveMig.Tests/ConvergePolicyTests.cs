using LiveMig.Memory;
using LiveMig.Policies;

namespace LiveMig.Tests;

/// <summary>The convergence policies on synthetic round sequences: no VM, no network, no clock.</summary>
public class ConvergePolicyTests
{
    private const double Bandwidth = 25_000; // pages/s (~100 MiB/s)

    /// <summary>
    /// A sequence of rounds at <see cref="Bandwidth"/>: round 0 sends <paramref name="memoryPages"/>,
    /// each later round sends what the previous one left pending, and leaves
    /// <paramref name="next"/>(round, sent) pending.
    /// </summary>
    private static IEnumerable<RoundStats> Rounds(long memoryPages, Func<int, long, long> next, int count)
    {
        long send = memoryPages;
        for (int k = 0; k < count; k++)
        {
            var duration = TimeSpan.FromSeconds(send / Bandwidth);
            long after = next(k, send);
            yield return new RoundStats(k, send, send * PreCopyPolicy.BytesPerPage, duration, after,
                send * PreCopyPolicy.BytesPerPage / duration.TotalSeconds, after / duration.TotalSeconds) { PagesDirtied = after };
            send = after;
        }
    }

    private static readonly Func<int, long, long> Converging = (_, sent) => sent / 2;
    private static readonly Func<int, long, long> Steady = (k, sent) => k == 0 ? 20_000 : 20_000;
    private static readonly Func<int, long, long> Diverging = (k, sent) => k == 0 ? 20_000 : (long)(sent * 1.25);

    [Fact]
    public void Predictor_sees_a_converging_sequence_and_expects_another_round_to_pay()
    {
        var p = new DirtyRatePredictor();
        foreach (var r in Rounds(100_000, Converging, 4)) p.Observe(r);
        Assert.Equal(0.5, p.Trend, 3);
        Assert.Equal(Bandwidth, p.BandwidthPagesPerSecond, 0);
        var f = p.Forecast();
        Assert.Equal(6_250, p.Pending);
        Assert.Equal(TimeSpan.FromSeconds(6_250 / Bandwidth).TotalMilliseconds, f.DowntimeIfStopNow.TotalMilliseconds, 1);
        Assert.Equal(f.DowntimeIfStopNow.TotalMilliseconds, f.NextRoundTime.TotalMilliseconds, 1); // nothing deferred: it sends them all
        Assert.InRange(f.PagesPendingAfterNextRound, 3_000, 3_300);
        Assert.InRange(f.DowntimeAfterNextRound.TotalMilliseconds, 0.45 * f.DowntimeIfStopNow.TotalMilliseconds, 0.55 * f.DowntimeIfStopNow.TotalMilliseconds);
        Assert.True(f.AnotherRoundPays(10));
        Assert.True(f.RemainingIfContinue > f.RemainingIfStopNow); // one more round costs total time...
        Assert.True(f.DowntimeGain > TimeSpan.Zero);                // ...and buys downtime
    }

    [Fact]
    public void Predictor_sees_a_steady_sequence_and_expects_no_gain()
    {
        var p = new DirtyRatePredictor();
        foreach (var r in Rounds(100_000, Steady, 4)) p.Observe(r);
        Assert.Equal(1.0, p.Trend, 3);
        var f = p.Forecast();
        Assert.True(f.DowntimeAfterNextRound >= f.DowntimeIfStopNow * 0.99, $"{f}");
        Assert.False(f.AnotherRoundPays(10));
    }

    [Fact]
    public void Predictor_sees_a_diverging_sequence_and_expects_a_longer_downtime()
    {
        var p = new DirtyRatePredictor();
        foreach (var r in Rounds(100_000, Diverging, 5)) p.Observe(r);
        Assert.True(p.Trend > 1.2, $"trend {p.Trend}");
        var f = p.Forecast();
        Assert.True(f.DowntimeAfterNextRound > f.DowntimeIfStopNow * 1.2, $"{f}");
        Assert.True(f.DowntimeGain < TimeSpan.Zero);
        Assert.False(f.AnotherRoundPays(1000));
    }

    [Fact]
    public void Predictor_knows_nothing_before_the_first_round()
    {
        var f = new DirtyRatePredictor().Forecast();
        Assert.Equal(TimeSpan.MaxValue, f.DowntimeIfStopNow);
        Assert.False(f.AnotherRoundPays(10));
    }

    private static (List<PreCopyDecision> Decisions, PreCopyPolicy Policy) Drive(PreCopyOptions options, Func<int, long, long> next, int max = 40)
    {
        var policy = new PreCopyPolicy(options, TimeProvider.System);
        var decisions = new List<PreCopyDecision>();
        foreach (var r in Rounds(100_000, next, max))
        {
            var d = policy.AfterRound(r);
            decisions.Add(d);
            if (d.StopAndCopy) break;
        }
        return (decisions, policy);
    }

    [Fact]
    public void Predictive_stop_iterates_while_converging_and_stops_at_once_when_steady()
    {
        var target = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(10), PredictiveStop = true };
        var (converging, _) = Drive(target, Converging);
        Assert.Equal(StopReason.DowntimeTarget, converging[^1].Reason);
        Assert.True(converging[^1].EstimatedDowntime <= TimeSpan.FromMilliseconds(10));

        var (steady, _) = Drive(target, Steady);
        Assert.Equal(StopReason.NoGain, steady[^1].Reason);
        // The classic rule needs NonConvergenceRounds rounds of evidence; the prediction needs one.
        var (classic, _) = Drive(target with { PredictiveStop = false }, Steady);
        Assert.Equal(StopReason.NonConvergence, classic[^1].Reason);
        Assert.True(steady.Count < classic.Count, $"predictive stopped after {steady.Count} rounds, classic after {classic.Count}");

        var (diverging, _) = Drive(target, Diverging);
        Assert.Equal(StopReason.NoGain, diverging[^1].Reason);
        Assert.True(diverging.Count <= 2);
    }

    [Fact]
    public void Auto_converge_throttles_in_growing_steps_and_gives_up_only_at_the_maximum()
    {
        var options = new PreCopyOptions
        {
            DowntimeLimit = TimeSpan.FromMilliseconds(10), PredictiveStop = true, MaxRounds = 100,
            AutoConverge = new AutoConvergeOptions { Initial = 0.2, Increment = 0.1, Max = 0.5, TriggerRounds = 2 },
        };
        var (decisions, policy) = Drive(options, Steady, 100);
        double[] steps = [.. decisions.Where(d => d.Throttle is not null).Select(d => d.Throttle!.Value)];
        Assert.Equal([0.2, 0.3, 0.4, 0.5], steps, (a, b) => Math.Abs(a - b) < 1e-9);
        // Every step came two non-converging rounds after the previous one (QEMU's dirty_rate_high_cnt).
        int[] at = [.. decisions.Select((d, i) => (d, i)).Where(x => x.d.Throttle is not null).Select(x => x.i)];
        Assert.Equal([2, 4, 6, 8], at); // round 0 converged (20% left); rounds 1 and 2 did not
        Assert.False(policy.Convergence.CanEscalate);
        Assert.Equal(StopReason.NoGain, decisions[^1].Reason);
        Assert.True(decisions.Count > at[^1] + 1, "it stopped only after the last step");
    }

    [Fact]
    public void Dirty_limit_comes_first_then_the_throttle_steps()
    {
        var options = new PreCopyOptions
        {
            DowntimeLimit = TimeSpan.FromMilliseconds(10), MaxRounds = 100, DirtyLimit = 500,
            AutoConverge = new AutoConvergeOptions { Initial = 0.3, Increment = 0.3, Max = 0.9, TriggerRounds = 1 },
        };
        var (decisions, policy) = Drive(options, Steady, 100);
        var actions = decisions.Where(d => d.Throttle is not null || d.DirtyLimit is not null).ToList();
        Assert.Equal(500, actions[0].DirtyLimit);
        Assert.Null(actions[0].Throttle);
        Assert.Equal([0.3, 0.6, 0.9], actions.Skip(1).Select(a => a.Throttle!.Value), (a, b) => Math.Abs(a - b) < 1e-9);
        Assert.Equal(StopReason.NonConvergence, decisions[^1].Reason);
        Assert.Equal(500, policy.Convergence.DirtyLimit);

        // Dirty limit alone: one step, then the ordinary stop conditions.
        var (alone, _) = Drive(options with { AutoConverge = null }, Steady, 100);
        Assert.Single(alone, d => d.DirtyLimit is not null);
        Assert.DoesNotContain(alone, d => d.Throttle is not null);
    }

    [Fact]
    public void Converging_rounds_are_never_throttled()
    {
        var options = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(10), AutoConverge = new AutoConvergeOptions(), DirtyLimit = 100 };
        var (decisions, _) = Drive(options, Converging);
        Assert.DoesNotContain(decisions, d => d.Throttle is not null || d.DirtyLimit is not null);
        Assert.Equal(StopReason.DowntimeTarget, decisions[^1].Reason);
    }

    [Fact]
    public void Hot_page_tracker_finds_pages_redirtied_every_round_and_leaves_cold_ones()
    {
        const long pages = 1000;
        var t = new HotPageTracker(pages, window: 3, threshold: 2);
        var rng = new Random(3);
        var cold = new HashSet<long>();
        for (int round = 0; round < 5; round++)
        {
            var dirtied = new PageBitmap(pages);
            for (long p = 100; p < 110; p++) dirtied.Set(p); // hot: every round
            dirtied.Set(500 + round);                        // a cold page, once each
            cold.Add(500 + round);
            if (round % 3 == 0) dirtied.Set(900);            // lukewarm: once every 3 rounds
            t.Observe(dirtied);
        }
        for (long p = 100; p < 110; p++) Assert.True(t.IsHot(p), $"page {p}");
        Assert.Equal(3, t.Heat(100));
        foreach (long p in cold) Assert.False(t.IsHot(p), $"page {p}");
        Assert.False(t.IsHot(900));
        Assert.False(t.IsHot(0));

        var pending = new PageBitmap(pages);
        for (long p = 100; p < 110; p++) pending.Set(p);
        foreach (long p in cold) pending.Set(p);
        pending.Set(900);
        var sendNow = new PageBitmap(pages);
        long send = t.Select(pending, sendNow, long.MaxValue, out long deferred);
        Assert.Equal(10, deferred);
        Assert.Equal(cold.Count + 1, send);
        for (long p = 100; p < 110; p++) Assert.False(sendNow.IsSet(p));
        foreach (long p in cold) Assert.True(sendNow.IsSet(p));
        // The cap: hold back at most 4 (the rest of the hot pages are sent).
        send = t.Select(pending, sendNow, 4, out deferred);
        Assert.Equal(4, deferred);
        Assert.Equal(cold.Count + 1 + 6, send);

        // A page that stops being written cools down within the window.
        var nothing = new PageBitmap(pages);
        t.Observe(nothing);
        t.Observe(nothing);
        Assert.False(t.IsHot(100));
    }

    [Fact]
    public void Policy_defers_hot_pages_only_with_the_option_and_within_the_downtime_budget()
    {
        const long pages = 4096;
        var dirtied = new PageBitmap(pages);
        for (long p = 0; p < 300; p++) dirtied.Set(p);
        RoundStats Round(int k) => new(k, pages, pages * PreCopyPolicy.BytesPerPage, TimeSpan.FromSeconds(pages / Bandwidth), 300,
            pages * PreCopyPolicy.BytesPerPage / (pages / Bandwidth), 300 / (pages / Bandwidth));

        foreach (bool defer in new[] { false, true })
        {
            // A 4 ms downtime limit at 25,000 pages/s carries 100 pages.
            var policy = new PreCopyPolicy(new PreCopyOptions { DeferHotPages = defer, DowntimeLimit = TimeSpan.FromMilliseconds(4) }, TimeProvider.System);
            var pending = new PageBitmap(pages);
            var sendNow = new PageBitmap(pages);
            for (int k = 0; k < 3; k++)
            {
                pending.Or(dirtied);
                long n = policy.PlanNextRound(dirtied, pending, sendNow);
                long expected = !defer || k == 0 ? 300 : 200;
                Assert.Equal(expected, n);
                Assert.Equal(n, sendNow.Count());
                policy.AfterRound(Round(k) with { NextRoundPages = n });
            }
        }
    }

    [Fact]
    public void Recommended_turns_every_aid_on_and_keeps_the_rest()
    {
        var o = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50), MaxRounds = 7 }.WithConvergenceAids();
        Assert.True(o.DeferHotPages && o.SkipRewrittenPages && o.PredictiveStop);
        Assert.NotNull(o.AutoConverge);
        Assert.Equal(0.2, o.AutoConverge.Initial);
        Assert.Equal(0.1, o.AutoConverge.Increment);
        Assert.Equal(TimeSpan.FromMilliseconds(50), o.DowntimeLimit);
        Assert.Equal(7, o.MaxRounds);
        Assert.True(PreCopyOptions.Recommended.DeferHotPages);
        Assert.Throws<ArgumentOutOfRangeException>(() => new PreCopyPolicy(new PreCopyOptions { HotThreshold = 4 }, TimeProvider.System));
        Assert.Throws<ArgumentOutOfRangeException>(() => new PreCopyPolicy(new PreCopyOptions { AutoConverge = new() { Initial = 1.5 } }, TimeProvider.System));
    }
}
