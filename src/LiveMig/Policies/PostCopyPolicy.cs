namespace LiveMig.Policies;

/// <summary>Why the source switched to post-copy (the report's <c>stopReason</c>).</summary>
public enum SwitchReason { None, Immediate, RoundBudget, TimeBudget, ByteBudget, NonConvergence, Converged }

public readonly record struct SwitchDecision(bool Switch, SwitchReason Reason);

/// <summary>
/// Answers "switch to post-copy now?": before the first pre-copy round and after each one.
/// No I/O, time only through the <see cref="TimeProvider"/> given, like <see cref="IPreCopyPolicy"/>.
/// </summary>
public interface IPostCopySwitchPolicy
{
    SwitchDecision BeforeFirstRound();
    SwitchDecision AfterRound(RoundStats round);
}

/// <summary>Pure post-copy (Hines and Gopalan): switch at once, before any page is sent.</summary>
public sealed class PostCopyPolicy : IPostCopySwitchPolicy
{
    public SwitchDecision BeforeFirstRound() => new(true, SwitchReason.Immediate);
    public SwitchDecision AfterRound(RoundStats round) => new(true, SwitchReason.Immediate);
}

public sealed record HybridOptions
{
    /// <summary>Most pre-copy rounds (round 0 included) before the switch.</summary>
    public int MaxRounds { get; init; } = 5;
    /// <summary>Switch once the pre-copy phase has run this long (null: no limit).</summary>
    public TimeSpan? TimeBudget { get; init; }
    /// <summary>Switch once pre-copy has put this many bytes on the wire (null: no limit).</summary>
    public long? ByteBudget { get; init; }
    /// <summary>The dirty set "stops shrinking" when a round leaves more than this fraction of the previous round's dirty pages.</summary>
    public double ShrinkFactor { get; init; } = 0.9;
}

/// <summary>
/// Hybrid: pre-copy rounds while they pay, then post-copy. Switches when the round, time or
/// byte budget is spent, when the dirty set stops shrinking (pre-copy would only resend the
/// writable working set), or when nothing is dirty (post-copy then has nothing to fetch).
/// </summary>
public sealed class HybridPolicy(HybridOptions options, TimeProvider time) : IPostCopySwitchPolicy
{
    private readonly long _start = time.GetTimestamp();
    private long _bytes;
    private long _previousDirty = long.MaxValue;

    public HybridOptions Options => options;

    public SwitchDecision BeforeFirstRound() => options.MaxRounds <= 0 ? new(true, SwitchReason.RoundBudget) : default;

    public SwitchDecision AfterRound(RoundStats round)
    {
        _bytes += round.BytesSent;
        long previous = _previousDirty;
        _previousDirty = round.DirtyPagesAfter;
        if (round.DirtyPagesAfter == 0) return new(true, SwitchReason.Converged);
        if (round.Round + 1 >= options.MaxRounds) return new(true, SwitchReason.RoundBudget);
        if (options.ByteBudget is { } bytes && _bytes >= bytes) return new(true, SwitchReason.ByteBudget);
        if (options.TimeBudget is { } budget && time.GetElapsedTime(_start) >= budget) return new(true, SwitchReason.TimeBudget);
        if (round.Round >= 1 && round.DirtyPagesAfter > previous * options.ShrinkFactor) return new(true, SwitchReason.NonConvergence);
        return default;
    }

    public static string Name(SwitchReason r) => r switch
    {
        SwitchReason.Immediate => "immediate",
        SwitchReason.RoundBudget => "round-budget",
        SwitchReason.TimeBudget => "time-budget",
        SwitchReason.ByteBudget => "byte-budget",
        SwitchReason.NonConvergence => "non-convergence",
        SwitchReason.Converged => "converged",
        _ => "",
    };
}
