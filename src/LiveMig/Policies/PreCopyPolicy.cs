using LiveMig.Memory;
using LiveMig.Pipeline;

namespace LiveMig.Policies;

/// <summary>What the engine measured in one round: all a policy sees.</summary>
/// <param name="DirtyPagesAfter">Pages pending at the end of the round (dirtied, skipped or deferred): what a stop-and-copy now would send.</param>
/// <param name="DirtyRatePagesPerSecond">Pages written during the round ÷ the time between its harvest and the previous one.</param>
public sealed record RoundStats(
    int Round, long PagesSent, long BytesSent, TimeSpan Duration, long DirtyPagesAfter,
    double BandwidthBytesPerSecond, double DirtyRatePagesPerSecond)
{
    /// <summary>Pages the round did not send because they were written again after their harvest (they stay pending).</summary>
    public long PagesSkipped { get; init; }
    /// <summary>Pending pages the round held back as hot (they stay pending).</summary>
    public long PagesDeferred { get; init; }
    /// <summary>Pages written during the round (its harvest); null: take <see cref="DirtyPagesAfter"/>.</summary>
    public long? PagesDirtied { get; init; }
    /// <summary>How many of the pending pages the next live round would send (the rest are deferred); null: all of them.</summary>
    public long? NextRoundPages { get; init; }
    /// <summary>The switch-over's fixed cost as measured so far (round trips, VM state): part of every downtime estimate.</summary>
    public TimeSpan SwitchoverCost { get; init; }
}

/// <summary>
/// Why the live rounds ended (the report's <c>stopReason</c>): pre-copy's stop conditions, and
/// hybrid's reasons to switch to post-copy (<see cref="Immediate"/> … <see cref="Converged"/>).
/// </summary>
public enum StopReason { None, DowntimeTarget, MaxRounds, NonConvergence, TimeBudget, NoGain, Immediate, RoundBudget, ByteBudget, Converged }

public static class StopReasons
{
    /// <summary>The report's name for a reason: <c>downtime-target</c>, <c>round-budget</c>, …; empty for none.</summary>
    public static string Name(StopReason r) => r switch
    {
        StopReason.DowntimeTarget => "downtime-target",
        StopReason.MaxRounds => "max-rounds",
        StopReason.NonConvergence => "non-convergence",
        StopReason.TimeBudget => "time-budget",
        StopReason.NoGain => "no-gain",
        StopReason.Immediate => "immediate",
        StopReason.RoundBudget => "round-budget",
        StopReason.ByteBudget => "byte-budget",
        StopReason.Converged => "converged",
        _ => "",
    };
}

/// <param name="StopAndCopy">End the live rounds: pre-copy stops and copies, hybrid switches to post-copy.</param>
/// <param name="EstimatedDowntime">What a stop-and-copy now would take: pending pages at the measured wire cost and bandwidth, plus the switch-over's fixed cost.</param>
public readonly record struct PreCopyDecision(bool StopAndCopy, StopReason Reason, TimeSpan EstimatedDowntime)
{
    /// <summary>Set the vCPU throttle to this (auto-converge); null: leave it.</summary>
    public double? Throttle { get; init; }
    /// <summary>Cap each vCPU's dirty rate at this many pages/s (dirty-limit); null: leave it.</summary>
    public double? DirtyLimit { get; init; }
    /// <summary>What the predictor expected when the decision was made.</summary>
    public RoundForecast? Forecast { get; init; }
    /// <summary>How the live rounds end when <see cref="StopAndCopy"/> is set: a stop-and-copy, a switch to post-copy, or no switch at all.</summary>
    public RoundsEnding Ending { get; init; }
    /// <summary>The rounds ended short of the downtime target (a stop-and-copy now would pause the guest longer than the limit); <see cref="Ending"/> says what <see cref="PreCopyOptions.OnStall"/> made of it.</summary>
    public bool Stalled { get; init; }
}

/// <summary>How the live rounds end.</summary>
public enum RoundsEnding
{
    /// <summary>Pause and send the rest (pre-copy's switch-over).</summary>
    StopAndCopy,
    /// <summary>Pause and switch to post-copy: the VM resumes at the destination, the rest follows (hybrid; pre-copy with <c>--on-stall postcopy</c>).</summary>
    PostCopy,
    /// <summary>Do not switch: the migration fails and the VM keeps running on the source, unslowed (the downtime limit is a promise).</summary>
    Abort,
}

/// <summary>What pre-copy does when its rounds stop converging before the downtime target is met (<c>--on-stall</c>).</summary>
public enum StallAction
{
    /// <summary>Fail the migration, the VM keeps running on the source (the default: the limit is a promise).</summary>
    Abort,
    /// <summary>Slow the guest (auto-converge and the dirty limit, when given) until it converges; abort once no brake is left.</summary>
    Throttle,
    /// <summary>Switch to post-copy, as hybrid does.</summary>
    PostCopy,
    /// <summary>Pause anyway, if the estimate is within <see cref="PreCopyOptions.MaxDowntime"/>; else abort.</summary>
    Pause,
}

/// <summary>
/// Answers the engine's questions: which pending pages the next round sends, and after each
/// round whether to iterate again or stop and copy, and whether to slow the guest. It sees
/// statistics and bitmaps only; no I/O, no clock but the one given: a simulator can drive it too.
/// </summary>
public interface IPreCopyPolicy
{
    PreCopyDecision AfterRound(RoundStats round);

    /// <summary>
    /// After each live round's harvest and before <see cref="AfterRound"/>: <paramref name="dirtied"/>
    /// holds the pages written during the round, <paramref name="pending"/> every page waiting to
    /// be sent. Fills <paramref name="sendNow"/> with the pages the next live round sends; the rest
    /// stay pending for a later round or the stop-and-copy. Returns how many. Default: all of them.
    /// </summary>
    long PlanNextRound(PageBitmap dirtied, PageBitmap pending, PageBitmap sendNow)
    {
        sendNow.CopyFrom(pending);
        return pending.Count();
    }

    /// <summary>Whether live rounds skip a page already written again since its harvest (it will be sent later anyway; only where the dirty log can tell cheaply).</summary>
    bool SkipRewrittenPages => false;

    /// <summary>The migration's rounds begin now: budgets (time, bytes) count from here, not from when the policy was made.</summary>
    void MigrationStarted() { }
}

public sealed record PreCopyOptions
{
    /// <summary>Stop and copy once the remaining dirty pages would take at most this long to send (QEMU's default is 300 ms).</summary>
    public TimeSpan DowntimeLimit { get; init; } = TimeSpan.FromMilliseconds(300);
    public int MaxRounds { get; init; } = 30;
    /// <summary>Stop when the dirty set failed to shrink by <see cref="ShrinkFactor"/> this many rounds in a row.</summary>
    public int NonConvergenceRounds { get; init; } = 3;
    public double ShrinkFactor { get; init; } = 0.9;
    /// <summary>Stop and copy when the live phase has run this long (null: no budget).</summary>
    public TimeSpan? TimeBudget { get; init; }

    /// <summary>Hold pages dirtied in at least <see cref="HotThreshold"/> of the last <see cref="HotWindow"/> rounds back for the stop-and-copy instead of re-sending them every round (at most as many as the downtime limit can carry).</summary>
    public bool DeferHotPages { get; init; }
    public int HotWindow { get; init; } = 3;
    public int HotThreshold { get; init; } = 2;
    /// <summary>In live rounds, skip a page written again since its harvest: it is pending again and will be sent later anyway (Clark et al.). Software dirty log only; the kernel log cannot be peeked at per page cheaply.</summary>
    public bool SkipRewrittenPages { get; init; }
    /// <summary>Also stop when the predictor says one more round would not lower the downtime enough to pay for its time (<see cref="DowntimeWorth"/>).</summary>
    public bool PredictiveStop { get; init; }
    /// <summary>How much migration time one unit of downtime saved is worth: another round must save at least 1/this of its own duration in downtime (10: a 1 s round must save 100 ms).</summary>
    public double DowntimeWorth { get; init; } = 10;
    /// <summary>Throttle the vCPUs in growing steps when rounds do not converge; null: off.</summary>
    public AutoConvergeOptions? AutoConverge { get; init; }
    /// <summary>When rounds do not converge, cap each vCPU at this many page writes per second (QEMU's dirty-limit), before any CPU throttle step; 0: off.</summary>
    public double DirtyLimit { get; init; }
    /// <summary>What to do when the rounds stop short of the downtime target (non-convergence, the round limit, the time budget, no gain).</summary>
    public StallAction OnStall { get; init; }
    /// <summary>With <see cref="StallAction.Pause"/>: the longest pause accepted instead of <see cref="DowntimeLimit"/>.</summary>
    public TimeSpan? MaxDowntime { get; init; }

    /// <summary>
    /// These options with every convergence aid on: hot-page deferral, skipping re-written pages,
    /// the predictive stop and auto-converge (QEMU's default steps). The one place to turn them
    /// all on (e.g. for an "optimize all" switch); the dirty limit needs a number, so it is left as is.
    /// </summary>
    public PreCopyOptions WithConvergenceAids() => this with
    {
        DeferHotPages = true,
        SkipRewrittenPages = true,
        PredictiveStop = true,
        AutoConverge = AutoConverge ?? new AutoConvergeOptions(),
    };

    /// <summary>Defaults with every convergence aid on (<see cref="WithConvergenceAids"/>).</summary>
    public static PreCopyOptions Recommended => new PreCopyOptions().WithConvergenceAids();

    internal void Check()
    {
        if (DowntimeLimit < TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(DowntimeLimit), DowntimeLimit, "must not be negative");
        if (MaxRounds < 1) throw new ArgumentOutOfRangeException(nameof(MaxRounds), MaxRounds, "must be at least 1");
        if (HotWindow is < 1 or > 8) throw new ArgumentOutOfRangeException(nameof(HotWindow), HotWindow, "must be 1..8 rounds");
        if (HotThreshold < 1 || HotThreshold > HotWindow) throw new ArgumentOutOfRangeException(nameof(HotThreshold), HotThreshold, "must be 1..HotWindow");
        if (!(DowntimeWorth > 0)) throw new ArgumentOutOfRangeException(nameof(DowntimeWorth), DowntimeWorth, "must be positive");
        AutoConverge?.Check();
        if (!(DirtyLimit >= 0) || double.IsInfinity(DirtyLimit)) throw new ArgumentOutOfRangeException(nameof(DirtyLimit), DirtyLimit, "must be a finite number of pages/s, 0 for none");
        if (MaxDowntime is { } max && max < DowntimeLimit) throw new ArgumentOutOfRangeException(nameof(MaxDowntime), max, "must be at least the downtime limit");
    }

    /// <summary>Accept any pause when the rounds stall (tests and benchmarks that measure a forced stop-and-copy).</summary>
    public PreCopyOptions PauseOnStall(TimeSpan? max = null) => this with { OnStall = StallAction.Pause, MaxDowntime = max ?? TimeSpan.FromHours(1) };
}

/// <summary>
/// The pre-copy decisions. Stop conditions (Clark et al.): the estimated downtime (pending pages
/// × measured wire bytes per page ÷ measured bandwidth, plus the switch-over's fixed cost) is under the target; or the round limit is hit; or the time budget is
/// spent; or the dirty set stops shrinking; or, with <see cref="PreCopyOptions.PredictiveStop"/>,
/// the <see cref="DirtyRatePredictor"/> says another round would not pay for itself. Pages: with
/// <see cref="PreCopyOptions.DeferHotPages"/> a <see cref="HotPageTracker"/> keeps the writable
/// working set for the stop-and-copy. Guest: a <see cref="ConvergenceThrottle"/> throttles or
/// dirty-limits a guest whose rounds do not converge, and while it still can, the policy does not
/// give up on non-convergence.
/// </summary>
public sealed class PreCopyPolicy : IPreCopyPolicy
{
    private readonly PreCopyOptions _options;
    private readonly TimeProvider _time;
    private long _start;
    private long _previousDirty = long.MaxValue;
    private int _notShrinking;

    public PreCopyPolicy(PreCopyOptions options, TimeProvider time)
    {
        options.Check();
        _options = options;
        _time = time;
        _start = time.GetTimestamp();
        // Throttling on a stall is auto-converge (QEMU's steps unless given): the brakes come on before the rounds give up.
        var auto = options.OnStall == StallAction.Throttle ? options.AutoConverge ?? new AutoConvergeOptions() : options.AutoConverge;
        Convergence = new ConvergenceThrottle(auto, options.DirtyLimit);
    }

    public PreCopyOptions Options => _options;
    public DirtyRatePredictor Predictor { get; } = new();
    public ConvergenceThrottle Convergence { get; }
    /// <summary>Made at the first plan when hot pages are deferred.</summary>
    public HotPageTracker? HotPages { get; private set; }

    /// <summary>Wire bytes one page costs when sent raw: the downtime estimate's unit until rounds have measured the real cost.</summary>
    public const int BytesPerPage = GuestMemory.PageSize + PageBatchWriter.EntryHeaderSize;

    public double MeasuredBandwidth => Predictor.BandwidthBytesPerSecond;

    public bool SkipRewrittenPages => _options.SkipRewrittenPages;

    public void MigrationStarted() => _start = _time.GetTimestamp();

    public long PlanNextRound(PageBitmap dirtied, PageBitmap pending, PageBitmap sendNow)
    {
        if (!_options.DeferHotPages)
        {
            sendNow.CopyFrom(pending);
            return pending.Count();
        }
        HotPages ??= new HotPageTracker(pending.PageCount, _options.HotWindow, _options.HotThreshold);
        HotPages.Observe(dirtied);
        // Deferred pages are sent in the downtime: never hold back more than the downtime limit can carry.
        double seconds = Math.Max(0, (_options.DowntimeLimit - Predictor.SwitchoverCost).TotalSeconds);
        long cap = (long)Math.Min(Math.Floor(Predictor.BandwidthPagesPerSecond * seconds + 1e-6), long.MaxValue / 2);
        return HotPages.Select(pending, sendNow, cap, out _);
    }

    public PreCopyDecision AfterRound(RoundStats round)
    {
        var d = Decide(round);
        if (!d.StopAndCopy || d.Reason == StopReason.DowntimeTarget || d.EstimatedDowntime <= _options.DowntimeLimit) return d;
        // The rounds end short of the target: a stop-and-copy now would break the downtime promise.
        return _options.OnStall switch
        {
            StallAction.Pause when _options.MaxDowntime is { } max && d.EstimatedDowntime <= max => d with { Stalled = true },
            StallAction.PostCopy => d with { Stalled = true, Ending = RoundsEnding.PostCopy },
            _ => d with { Stalled = true, Ending = RoundsEnding.Abort },
        };
    }

    private PreCopyDecision Decide(RoundStats round)
    {
        Predictor.Observe(round);
        var forecast = Predictor.Forecast();
        var estimate = forecast.DowntimeIfStopNow;
        PreCopyDecision Stop(StopReason why) => new(true, why, estimate) { Forecast = forecast };

        if (round.DirtyPagesAfter == 0 || estimate <= _options.DowntimeLimit) return Stop(StopReason.DowntimeTarget);
        if (round.Round + 1 >= _options.MaxRounds) return Stop(StopReason.MaxRounds);
        if (_options.TimeBudget is { } budget && _time.GetElapsedTime(_start) >= budget) return Stop(StopReason.TimeBudget);
        // Everything pending is held back as hot: a live round would send nothing.
        if (round.NextRoundPages == 0) return Stop(StopReason.NoGain);

        if (round.Round >= 1) _notShrinking = round.DirtyPagesAfter > _previousDirty * _options.ShrinkFactor ? _notShrinking + 1 : 0;
        _previousDirty = round.DirtyPagesAfter;

        if (Convergence.AfterRound(round) is { } step)
        {
            _notShrinking = 0; // the slowed guest gets its chance to converge
            return new(false, StopReason.None, estimate) { Throttle = step.Throttle, DirtyLimit = step.DirtyLimit, Forecast = forecast };
        }
        // While the guest can still be slowed down and is about to be, giving up would be premature.
        if (!Convergence.AboutToAct)
        {
            if (_notShrinking >= _options.NonConvergenceRounds) return Stop(StopReason.NonConvergence);
            if (_options.PredictiveStop && !forecast.AnotherRoundPays(_options.DowntimeWorth)) return Stop(StopReason.NoGain);
        }
        return new(false, StopReason.None, estimate) { Forecast = forecast };
    }
}
