using LiveMig.Memory;

namespace LiveMig.Policies;

public sealed record HybridOptions
{
    /// <summary>Most pre-copy rounds (round 0 included) before the switch; 0 switches at once (pure post-copy).</summary>
    public int MaxRounds { get; init; } = 5;
    /// <summary>Switch once the pre-copy phase has run this long (null: no limit).</summary>
    public TimeSpan? TimeBudget { get; init; }
    /// <summary>Switch once pre-copy has put this many bytes on the wire (null: no limit).</summary>
    public long? ByteBudget { get; init; }
}

/// <summary>
/// Hybrid (pre-copy rounds while they pay, then post-copy), as a round policy: the pre-copy
/// policy plans the rounds — hot-page deferral, skipping re-written pages, auto-converge and
/// the dirty limit included — and wherever it would stop and copy, hybrid switches to post-copy
/// instead, with pre-copy's reason (the downtime target is met, the rounds stopped converging,
/// another round does not pay…). Hybrid's own budgets end the rounds too: a round, time or byte
/// budget, or nothing left dirty (post-copy then has nothing to fetch). Decisions only, time
/// only through the <see cref="TimeProvider"/> given.
/// </summary>
public sealed class HybridPolicy : IPreCopyPolicy
{
    private readonly HybridOptions _options;
    private readonly PreCopyPolicy _rounds;
    private readonly TimeProvider _time;
    private long _start;
    private long _bytes;

    public HybridPolicy(HybridOptions options, PreCopyOptions rounds, TimeProvider time)
    {
        _options = options;
        // A stall is hybrid's cue to switch, never a reason to abort or to pause longer.
        _rounds = new PreCopyPolicy(rounds with { OnStall = StallAction.PostCopy }, time);
        _time = time;
        _start = time.GetTimestamp();
    }

    public HybridOptions Options => _options;
    /// <summary>The pre-copy policy that plans the rounds.</summary>
    public PreCopyPolicy Rounds => _rounds;

    /// <summary>No pre-copy round at all: the budget allows none.</summary>
    public bool SwitchesAtOnce => _options.MaxRounds <= 0;

    public bool SkipRewrittenPages => _rounds.SkipRewrittenPages;

    public void MigrationStarted()
    {
        _start = _time.GetTimestamp();
        _rounds.MigrationStarted();
    }

    public long PlanNextRound(PageBitmap dirtied, PageBitmap pending, PageBitmap sendNow) => _rounds.PlanNextRound(dirtied, pending, sendNow);

    public PreCopyDecision AfterRound(RoundStats round)
    {
        _bytes += round.BytesSent;
        var decision = _rounds.AfterRound(round);
        // A budget that ends the rounds wins over a brake step: the switch ends the guest's slowing anyway.
        if (Budget(round) is { } spent) decision = decision with { StopAndCopy = true, Reason = spent, Throttle = null, DirtyLimit = null };
        return decision.StopAndCopy ? decision with { Ending = RoundsEnding.PostCopy } : decision;
    }

    private StopReason? Budget(RoundStats round)
    {
        if (round.DirtyPagesAfter == 0) return StopReason.Converged;
        if (round.Round + 1 >= _options.MaxRounds) return StopReason.RoundBudget;
        if (_options.ByteBudget is { } bytes && _bytes >= bytes) return StopReason.ByteBudget;
        if (_options.TimeBudget is { } budget && _time.GetElapsedTime(_start) >= budget) return StopReason.TimeBudget;
        return null;
    }
}
