using LiveMig.Reporting;

namespace LiveMig.Engine;

/// <summary>
/// The live figures of one migration in progress, for <c>livemig status</c>: the source feeds
/// it as an <see cref="IMigrationObserver"/> (beside the progress display), the destination
/// from the frames it reads. <see cref="Snapshot"/> may be called from any thread while the
/// migration's own thread updates it.
/// </summary>
public sealed class MigrationProgress : IMigrationObserver
{
    private readonly Lock _lock = new();
    private readonly TimeProvider _time;
    private readonly long _t0;
    private MigrationStatus _fixed;
    private string _phase = "handshake";
    private int _round = -1;
    private long _roundPages = -1, _sentInRound, _remainingAfterRound = -1;
    private long _pagesInEarlierRounds, _bytes, _roundBytes0 = -1, _roundTs0;
    private double _dirtyRate, _bandwidth, _expectedDowntimeMs = -1;
    private bool _inRound;

    public MigrationProgress(Guid migrationId, string role, string strategy, string vmName, long memoryBytes, string peer, TimeProvider? time = null)
    {
        _time = time ?? TimeProvider.System;
        _t0 = _time.GetTimestamp();
        _fixed = new MigrationStatus
        {
            MigrationId = migrationId.ToString(), Role = role, Strategy = strategy, VmName = vmName, MemoryBytes = memoryBytes, Peer = peer,
            StartedAt = _time.GetUtcNow(),
        };
        MigrationId = migrationId;
    }

    public Guid MigrationId { get; }

    /// <summary>The source's bandwidth cap, read at each snapshot (it can change while the migration runs).</summary>
    public Func<long>? BandwidthLimit { get; init; }

    public string VmName => _fixed.VmName;

    /// <summary>The figures now.</summary>
    public MigrationStatus Snapshot()
    {
        lock (_lock)
        {
            return _fixed with
            {
                Phase = _phase,
                ElapsedMs = _time.GetElapsedTime(_t0).TotalMilliseconds,
                Round = _round,
                PagesRemaining = _inRound ? (_roundPages < 0 ? -1 : Math.Max(0, _roundPages - _sentInRound)) : _remainingAfterRound,
                DirtyRatePagesPerSecond = _dirtyRate,
                BandwidthBytesPerSecond = _inRound && LiveBandwidth() is > 0 and var live ? live : _bandwidth,
                ExpectedDowntimeMs = _expectedDowntimeMs,
                BytesTransferred = _bytes,
                PagesTransferred = _pagesInEarlierRounds + (_inRound ? _sentInRound : 0),
                BandwidthLimitBytesPerSecond = BandwidthLimit?.Invoke() ?? 0,
            };
        }
    }

    /// <summary>Bytes per second since the round's first progress report (0 until a second one).</summary>
    private double LiveBandwidth()
    {
        if (_roundBytes0 < 0) return 0;
        double secs = _time.GetElapsedTime(_roundTs0).TotalSeconds;
        return secs > 0.01 ? (_bytes - _roundBytes0) / secs : 0;
    }

    // ---- IMigrationObserver (the source's engines) ----

    public void Phase(string phase)
    {
        lock (_lock) _phase = phase;
    }

    public void RoundStarted(int round, long pagesToSend, bool final)
    {
        lock (_lock) BeginRound(round, pagesToSend);
    }

    public void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire)
    {
        lock (_lock)
        {
            _sentInRound = pagesSentInRound;
            MarkBytes(bytesOnWire);
        }
    }

    public void RoundCompleted(RoundReport r)
    {
        lock (_lock)
        {
            EndRound(r.PagesSent, r.Final ? 0 : r.PagesDirtied, r.DirtyRatePagesPerSecond, r.BandwidthBytesPerSecond);
            _expectedDowntimeMs = r.Final ? 0 : r.EstimatedDowntimeMs;
        }
    }

    // ---- the destination's feed (IncomingMigration) ----

    /// <summary>Round 0 will bring this many pages (the source's Extents).</summary>
    internal void Announced(long pages)
    {
        lock (_lock) _remainingAfterRound = pages;
    }

    /// <summary>A RoundStart: the round brings what the source had pending after the last one (or what it announced, for round 0).</summary>
    internal void DestinationRoundStarted(int round, bool final)
    {
        lock (_lock)
        {
            BeginRound(round, _remainingAfterRound);
            if (final) _phase = "paused";
        }
    }

    /// <summary>Everything read so far on the migration's connections, and pages placed in the round in progress.</summary>
    internal void Received(long bytes, long pagesInRound)
    {
        lock (_lock)
        {
            _sentInRound = pagesInRound;
            MarkBytes(bytes);
        }
    }

    /// <summary>
    /// A RoundEnd with the source's figures. The destination has no policy estimate: what a
    /// stop-and-copy would take is the pending pages at this round's bytes per page and rate.
    /// </summary>
    internal void DestinationRoundEnded(long pagesSent, long pagesPending, long bytesSent, double durationMs)
    {
        double secs = Math.Max(durationMs / 1000, 1e-6);
        double bandwidth = bytesSent / secs;
        lock (_lock)
        {
            EndRound(pagesSent, pagesPending, pagesPending / secs, bandwidth);
            _expectedDowntimeMs = pagesSent > 0 && bandwidth > 0 ? pagesPending * ((double)bytesSent / pagesSent) / bandwidth * 1000 : -1;
        }
    }

    /// <summary>Strategy as it became known (the destination learns of post-copy at the switch).</summary>
    internal void SetStrategy(string strategy)
    {
        lock (_lock) _fixed = _fixed with { Strategy = strategy };
    }

    private void BeginRound(int round, long pagesToSend)
    {
        _round = round;
        _roundPages = pagesToSend;
        _sentInRound = 0;
        _inRound = true;
        _roundBytes0 = -1;
    }

    private void EndRound(long pagesSent, long pending, double dirtyRate, double bandwidth)
    {
        _inRound = false;
        _pagesInEarlierRounds += pagesSent;
        _remainingAfterRound = pending;
        _dirtyRate = dirtyRate;
        _bandwidth = bandwidth;
    }

    private void MarkBytes(long bytes)
    {
        _bytes = Math.Max(_bytes, bytes);
        if (_roundBytes0 >= 0) return;
        _roundBytes0 = _bytes;
        _roundTs0 = _time.GetTimestamp();
    }
}
