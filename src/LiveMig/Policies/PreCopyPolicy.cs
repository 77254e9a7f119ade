using LiveMig.Memory;
using LiveMig.Pipeline;

namespace LiveMig.Policies;

/// <summary>What the engine measured in one round: all a policy sees.</summary>
public sealed record RoundStats(
    int Round, long PagesSent, long BytesSent, TimeSpan Duration, long DirtyPagesAfter,
    double BandwidthBytesPerSecond, double DirtyRatePagesPerSecond);

public enum StopReason { None, DowntimeTarget, MaxRounds, NonConvergence, TimeBudget }

public readonly record struct PreCopyDecision(bool StopAndCopy, StopReason Reason, TimeSpan EstimatedDowntime);

/// <summary>Answers "iterate again or stop and copy?". No I/O, no clock but the one given: the simulator can drive it too.</summary>
public interface IPreCopyPolicy
{
    PreCopyDecision AfterRound(RoundStats round);
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
}

/// <summary>
/// Clark et al.'s stop conditions: the estimated downtime (dirty bytes ÷ measured bandwidth) is
/// under the target; or the round limit is hit; or the dirty set stops shrinking (the writable
/// working set is as small as it gets); or the time budget is spent. Bandwidth is measured over
/// all rounds so far (bytes ÷ time), which round 0 dominates, so tiny late rounds do not make
/// it noisy.
/// </summary>
public sealed class PreCopyPolicy(PreCopyOptions options, TimeProvider time) : IPreCopyPolicy
{
    private readonly long _start = time.GetTimestamp();
    private long _bytes;
    private TimeSpan _elapsed;
    private long _previousDirty = long.MaxValue;
    private int _notShrinking;

    public PreCopyOptions Options => options;

    /// <summary>Wire bytes one page costs when sent raw: the bound the downtime estimate uses.</summary>
    public const int BytesPerPage = GuestMemory.PageSize + PageBatchWriter.EntryHeaderSize;

    public double MeasuredBandwidth => _elapsed > TimeSpan.Zero ? _bytes / _elapsed.TotalSeconds : 0;

    public PreCopyDecision AfterRound(RoundStats round)
    {
        _bytes += round.BytesSent;
        _elapsed += round.Duration;
        double bw = MeasuredBandwidth;
        var estimate = bw > 0 ? TimeSpan.FromSeconds(round.DirtyPagesAfter * (double)BytesPerPage / bw) : TimeSpan.MaxValue;
        if (round.DirtyPagesAfter == 0 || estimate <= options.DowntimeLimit) return new(true, StopReason.DowntimeTarget, estimate);
        if (round.Round + 1 >= options.MaxRounds) return new(true, StopReason.MaxRounds, estimate);
        if (round.Round >= 1)
        {
            _notShrinking = round.DirtyPagesAfter > _previousDirty * options.ShrinkFactor ? _notShrinking + 1 : 0;
            if (_notShrinking >= options.NonConvergenceRounds) return new(true, StopReason.NonConvergence, estimate);
        }
        _previousDirty = round.DirtyPagesAfter;
        if (options.TimeBudget is { } budget && time.GetElapsedTime(_start) >= budget) return new(true, StopReason.TimeBudget, estimate);
        return new(false, StopReason.None, estimate);
    }
}
