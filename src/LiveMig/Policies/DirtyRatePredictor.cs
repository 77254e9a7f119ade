namespace LiveMig.Policies;

/// <summary>What the predictor expects from stopping now versus running one more live round.</summary>
public readonly record struct RoundForecast(
    TimeSpan DowntimeIfStopNow,
    TimeSpan NextRoundTime,
    long PagesPendingAfterNextRound,
    TimeSpan DowntimeAfterNextRound)
{
    /// <summary>Time left to the switch-over if we stop now: the stop-and-copy.</summary>
    public TimeSpan RemainingIfStopNow => DowntimeIfStopNow;

    /// <summary>Time left if we run one more round first: that round, then a smaller stop-and-copy.</summary>
    public TimeSpan RemainingIfContinue => Saturating(NextRoundTime, DowntimeAfterNextRound);

    /// <summary>Downtime one more round is expected to save (negative: it makes things worse).</summary>
    public TimeSpan DowntimeGain => DowntimeIfStopNow == TimeSpan.MaxValue || DowntimeAfterNextRound == TimeSpan.MaxValue
        ? TimeSpan.Zero : DowntimeIfStopNow - DowntimeAfterNextRound;

    /// <summary>
    /// True when one more round pays for itself: it lowers the downtime, and each unit of time it
    /// adds to the migration buys at least 1/<paramref name="downtimeWorth"/> of a unit of downtime.
    /// </summary>
    public bool AnotherRoundPays(double downtimeWorth) =>
        DowntimeGain > TimeSpan.Zero && DowntimeGain.TotalSeconds * downtimeWorth >= NextRoundTime.TotalSeconds;

    private static TimeSpan Saturating(TimeSpan a, TimeSpan b) =>
        a == TimeSpan.MaxValue || b == TimeSpan.MaxValue || a.Ticks > TimeSpan.MaxValue.Ticks - b.Ticks ? TimeSpan.MaxValue : a + b;
}

/// <summary>
/// Estimates, from round statistics only, how the dirty set evolves: the bandwidth (bytes ÷ time
/// over all rounds, which round 0 dominates, so tiny late rounds do not make it noisy), an EWMA
/// of the dirty rate (pages written per second) and of the pending set's size, and the trend —
/// an EWMA of the ratio of successive pending sets (below 1: converging; about 1: steady; above
/// 1: diverging). From those it forecasts the downtime of stopping now and of stopping after one
/// more round, and how long that round would take. Pages are converted to time with the measured
/// wire bytes per page, and every downtime forecast includes the switch-over's fixed cost. No
/// clock, no I/O: a simulator can feed it.
/// </summary>
public sealed class DirtyRatePredictor
{
    private readonly double _alpha;
    private double _bytesPerPage;
    private bool _measuredBytesPerPage;
    private long _bytes;
    private TimeSpan _elapsed;
    private long _previousPending = -1;

    /// <param name="smoothing">EWMA weight of the newest round (0–1].</param>
    /// <param name="bytesPerPage">Wire bytes one page costs (the downtime estimate's unit) until a round has measured it.</param>
    public DirtyRatePredictor(double smoothing = 0.5, int bytesPerPage = PreCopyPolicy.BytesPerPage)
    {
        if (!(smoothing > 0 && smoothing <= 1)) throw new ArgumentOutOfRangeException(nameof(smoothing), "must be in (0, 1]");
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytesPerPage);
        _alpha = smoothing;
        _bytesPerPage = bytesPerPage;
    }

    public int Rounds { get; private set; }
    /// <summary>Bytes per second over all rounds so far; 0 before any.</summary>
    public double BandwidthBytesPerSecond => _elapsed > TimeSpan.Zero ? _bytes / _elapsed.TotalSeconds : 0;
    public double BandwidthPagesPerSecond => BandwidthBytesPerSecond / _bytesPerPage;
    /// <summary>
    /// Wire bytes a sent page costs: an EWMA of the rounds' bytes ÷ pages (compression, deltas,
    /// zero markers and framing included), the constructor's value until a round sent pages.
    /// Converting bandwidth to pages with the raw page size would overestimate the downtime of
    /// a migration whose pages shrink on the wire, and give up early.
    /// </summary>
    public double WireBytesPerPage => _bytesPerPage;
    /// <summary>The switch-over's fixed cost as last measured (added to every downtime forecast).</summary>
    public TimeSpan SwitchoverCost { get; private set; }
    /// <summary>EWMA of pages written per second.</summary>
    public double DirtyRate { get; private set; }
    /// <summary>EWMA of the pending set's size at the end of a round.</summary>
    public double PendingSet { get; private set; }
    /// <summary>EWMA of pending(k) ÷ pending(k-1); NaN until two rounds were seen.</summary>
    public double Trend { get; private set; } = double.NaN;
    /// <summary>The newest round's pending pages, and how many of them the next round would send and defer.</summary>
    public long Pending { get; private set; }
    public long NextRoundPages { get; private set; }
    public long NextRoundDeferred => Math.Max(0, Pending - NextRoundPages);

    public void Observe(RoundStats round)
    {
        _bytes += round.BytesSent;
        _elapsed += round.Duration;
        if (round.PagesSent > 0)
        {
            double perPage = (double)round.BytesSent / round.PagesSent;
            _bytesPerPage = _measuredBytesPerPage ? _alpha * perPage + (1 - _alpha) * _bytesPerPage : perPage;
            _measuredBytesPerPage = true;
        }
        SwitchoverCost = round.SwitchoverCost;
        double rate = round.DirtyRatePagesPerSecond;
        DirtyRate = Rounds == 0 ? rate : _alpha * rate + (1 - _alpha) * DirtyRate;
        PendingSet = Rounds == 0 ? round.DirtyPagesAfter : _alpha * round.DirtyPagesAfter + (1 - _alpha) * PendingSet;
        if (_previousPending > 0)
        {
            double ratio = (double)round.DirtyPagesAfter / _previousPending;
            Trend = double.IsNaN(Trend) ? ratio : _alpha * ratio + (1 - _alpha) * Trend;
        }
        _previousPending = round.DirtyPagesAfter;
        Pending = round.DirtyPagesAfter;
        NextRoundPages = round.NextRoundPages is { } n ? Math.Clamp(n, 0, Pending) : Pending;
        Rounds++;
    }

    /// <summary>
    /// Forecast after the newest round. The next round sends <see cref="NextRoundPages"/> at the
    /// measured bandwidth; the pages pending after it are the larger of two estimates: the rate
    /// model (pages written at <see cref="DirtyRate"/> during that round, at least the deferred
    /// pages that stay pending) and the trend model (this pending set × <see cref="Trend"/>). The
    /// larger one is the cautious choice: it leans towards stopping, never towards iterating
    /// forever. The rate model overestimates a shrinking working set little, the trend model
    /// catches a working set that no longer shrinks however short the rounds get.
    /// </summary>
    public RoundForecast Forecast()
    {
        double bw = BandwidthPagesPerSecond;
        if (bw <= 0 || Rounds == 0) return new(TimeSpan.MaxValue, TimeSpan.MaxValue, Pending, TimeSpan.MaxValue);
        double roundSeconds = NextRoundPages / bw;
        double byRate = Math.Max(NextRoundDeferred, DirtyRate * roundSeconds);
        double byTrend = double.IsNaN(Trend) ? 0 : Pending * Trend;
        double after = Math.Max(byRate, byTrend);
        double fixedCost = SwitchoverCost.TotalSeconds;
        return new(Seconds(Pending / bw + fixedCost), Seconds(roundSeconds), (long)Math.Min(after, long.MaxValue / 2), Seconds(after / bw + fixedCost));
    }

    private static TimeSpan Seconds(double s) => double.IsFinite(s) && s < TimeSpan.MaxValue.TotalSeconds / 2 ? TimeSpan.FromSeconds(s) : TimeSpan.MaxValue;
}
