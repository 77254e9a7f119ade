using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Core;

/// <summary>
/// The round loop of pre-copy (Clark et al., NSDI 2005), shared by every driver: the pre-copy
/// engine, hybrid's pre-copy phase, and the simulator. It owns the page sets — <see cref="Pending"/>
/// (every page the destination does not hold as it is now), the next round's selection, one
/// harvest of the dirty log — builds each round's <see cref="RoundStats"/>, asks the policy what
/// to send and whether to go on, and applies the brakes it asks for. It reaches the world only
/// through its ports: an <see cref="IRoundSender"/> (send, sync), an <see cref="IDirtyLog"/>
/// (harvest), <see cref="IGuestBrakes"/> (throttle, dirty limit) and a <see cref="TimeProvider"/>;
/// it never touches a socket, a page's bytes or the wall clock.
/// </summary>
public sealed class RoundController
{
    private readonly IPreCopyPolicy _policy;
    private readonly IRoundSender _sender;
    private readonly IDirtyLog _dirtyLog;
    private readonly IGuestBrakes _brakes;
    private readonly TimeProvider _time;
    private readonly IMigrationObserver? _observer;
    private readonly List<RoundReport> _rounds = [];
    private PageBitmap _sendNow = null!, _dirtied = null!;
    private long _sendCount, _deferred, _lastHarvest, _roundStart;
    private bool _skipRewritten;

    public RoundController(IPreCopyPolicy policy, IRoundSender sender, IDirtyLog dirtyLog, IGuestBrakes brakes, TimeProvider time, IMigrationObserver? observer = null)
    {
        _policy = policy;
        _sender = sender;
        _dirtyLog = dirtyLog;
        _brakes = brakes;
        _time = time;
        _observer = observer;
        Meter = new ThrottleMeter(brakes, time);
    }

    /// <summary>Every page the destination does not hold as it is now: sent pages leave it, harvested ones come back. What is pending at the pause goes in the stop-and-copy.</summary>
    public PageBitmap Pending { get; private set; } = null!;
    /// <summary>The round running or last run.</summary>
    public int Round { get; private set; }
    /// <summary>The decision that ended the live rounds (or the latest one).</summary>
    public PreCopyDecision Decision { get; private set; }
    /// <summary>Pages sent since the destination last acknowledged delivery (they may be lost with the connection), and their round; null when none.</summary>
    public PageBitmap? InFlight { get; private set; }
    public int InFlightRound { get; private set; } = -1;
    public IReadOnlyList<RoundReport> Rounds => _rounds;
    public long PagesSent { get; private set; }
    public long ZeroMarkers { get; private set; }
    public long PagesSkipped { get; private set; }
    /// <summary>Pending pages held back as hot when the live rounds ended.</summary>
    public long DeferredAtStop { get; private set; }
    public double MaxThrottle { get; private set; }
    public double MaxDirtyLimit { get; private set; }
    public ThrottleMeter Meter { get; }
    /// <summary>Whether live rounds skip pages written again since their harvest (the policy wants it and the dirty log can tell cheaply).</summary>
    public bool SkipsRewritten => _skipRewritten;
    /// <summary>Hold the page sets as <see cref="PageBitmap.Compact"/> bitmaps (no words while all clear or all set): for the simulator's single thread, where thousands of migrations run at once; the engine keeps plain ones.</summary>
    public bool CompactPageSets { get; init; }

    private PageBitmap NewPageSet(long pages) => CompactPageSets ? PageBitmap.Compact(pages) : new PageBitmap(pages);

    /// <summary>
    /// Starts the migration's rounds with <paramref name="firstRound"/> as round 0's pages (the
    /// dirty log must be tracking already, so no write after this is missed).
    /// </summary>
    public void Begin(PageBitmap firstRound)
    {
        Pending = NewPageSet(firstRound.PageCount);
        Pending.CopyFrom(firstRound);
        _sendNow = NewPageSet(firstRound.PageCount);
        _sendNow.CopyFrom(firstRound);
        _dirtied = NewPageSet(firstRound.PageCount);
        _sendCount = firstRound.Count();
        _lastHarvest = _time.GetTimestamp();
        _skipRewritten = _policy.SkipRewrittenPages && _dirtyLog.CanPeek;
        _policy.MigrationStarted();
    }

    /// <summary>
    /// Runs live rounds until the policy ends them (stop-and-copy, or the switch to post-copy);
    /// returns that decision. A failure of the sender propagates with <see cref="InFlight"/> set;
    /// after <see cref="Reattached"/> this can be called again and goes on with a new round.
    /// </summary>
    public PreCopyDecision RunLiveRounds(CancellationToken cancel)
    {
        while (true)
        {
            cancel.ThrowIfCancellationRequested();
            var r = StartLiveRound();
            var sent = _sender.SendRound(r.Round, false, r.Pages, r.Count, r.SkipZero, r.Rewritten, cancel);
            _sender.Sync(r.Round);
            var decision = FinishLiveRound(sent);
            if (decision.StopAndCopy) return decision;
        }
    }

    /// <summary>
    /// The first half of a live round, for a driver that cannot block while the round is on the
    /// wire (the simulator, where many migrations share one virtual clock): the pages leave the
    /// pending set and are in flight from now; the driver sends them and syncs (the round's time
    /// runs from this call), then calls <see cref="FinishLiveRound"/>. <see cref="RunLiveRounds"/>
    /// is exactly these two calls around the sender's SendRound and Sync.
    /// </summary>
    public RoundRequest StartLiveRound()
    {
        Pending.AndNot(_sendNow);
        (InFlight, InFlightRound) = (_sendNow, Round);
        _roundStart = _time.GetTimestamp();
        return new RoundRequest(Round, false, _sendNow, _sendCount, SkipZero: Round == 0, _skipRewritten ? Pending : null);
    }

    /// <summary>
    /// The second half of a live round, once the destination holds its pages (after Sync):
    /// harvest, plan the next round, ask the policy, apply the brakes it asks for. Returns the
    /// decision; unless it ends the rounds, the next <see cref="StartLiveRound"/> is the next round.
    /// </summary>
    public PreCopyDecision FinishLiveRound(RoundSent sent)
    {
        var stats = AfterLiveRound(sent);
        var decision = Decision = _policy.AfterRound(stats);
        Record(stats, final: false, decision.EstimatedDowntime);
        ApplyBrakes(decision);
        if (decision.StopAndCopy) DeferredAtStop = _deferred;
        else Round++;
        return decision;
    }

    /// <summary>The round is delivered: harvest, plan the next; the statistics the policy sees.</summary>
    private RoundStats AfterLiveRound(RoundSent sent)
    {
        InFlight = null;
        var duration = _time.GetElapsedTime(_roundStart);
        Count(sent);
        _dirtied.ClearAll();
        long harvested = _dirtyLog.Harvest(_dirtied);
        long harvestTs = _time.GetTimestamp();
        double interval = _time.GetElapsedTime(_lastHarvest, harvestTs).TotalSeconds;
        _lastHarvest = harvestTs;
        Pending.Or(_dirtied);
        long pendingCount = Pending.Count();
        _sendCount = _policy.PlanNextRound(_dirtied, Pending, _sendNow);
        var stats = new RoundStats(Round, sent.Pages, sent.Bytes, duration, pendingCount, sent.Bytes / Math.Max(duration.TotalSeconds, 1e-6), harvested / Math.Max(interval, 1e-6))
        {
            PagesSkipped = sent.Skipped,
            PagesDeferred = _deferred,
            PagesDirtied = harvested,
            NextRoundPages = _sendCount,
            SwitchoverCost = _sender.SwitchoverCost,
        };
        _deferred = pendingCount - _sendCount;
        _sender.EndRound(stats);
        return stats;
    }

    private void Count(RoundSent sent)
    {
        PagesSent += sent.Pages;
        ZeroMarkers += sent.ZeroMarkers;
        PagesSkipped += sent.Skipped;
    }

    /// <summary>Every step the migration took beyond plain rounds (brakes, a stall and what became of it), one line each, for the report.</summary>
    public List<string> Escalations { get; } = [];

    /// <summary>Mechanism only: the policy decided whether and how hard to slow the guest.</summary>
    private void ApplyBrakes(PreCopyDecision decision)
    {
        if (decision.Throttle is { } t)
        {
            _brakes.Throttle(t);
            Escalations.Add($"round {Round}: vCPU throttle {t * 100:0}%");
        }
        if (decision.DirtyLimit is { } l)
        {
            _brakes.LimitDirtyRate(l);
            Escalations.Add($"round {Round}: dirty limit {l:0} page writes/s per vCPU");
        }
        if (_brakes.ThrottleFraction > 0 || _brakes.DirtyRateLimit > 0) Meter.SlowedDown();
        MaxThrottle = Math.Max(MaxThrottle, _brakes.ThrottleFraction);
        MaxDirtyLimit = Math.Max(MaxDirtyLimit, _brakes.DirtyRateLimit);
    }

    /// <summary>
    /// At the pause: ends the throttle meter and lifts both brakes (the paused guest has nothing
    /// left to slow; a failed switch-over resumes it unslowed). Also on any failure.
    /// </summary>
    public void ReleaseBrakes()
    {
        Meter.Ended();
        _brakes.Throttle(0);
        _brakes.LimitDirtyRate(0);
    }

    /// <summary>The guest is paused: the last harvest joins the pending set, which is now exactly what the destination lacks. Returns its size.</summary>
    public long HarvestFinal()
    {
        _dirtyLog.Harvest(Pending);
        return Pending.Count();
    }

    /// <summary>The stop-and-copy: sends every pending page as the final round (the pending set stays in flight until the destination acknowledges the switch-over).</summary>
    public RoundStats SendFinalRound(long count)
    {
        var r = StartFinalRound(count);
        var sent = _sender.SendRound(r.Round, true, r.Pages, r.Count, r.SkipZero, null, CancellationToken.None);
        return FinishFinalRound(sent);
    }

    /// <summary>The first half of <see cref="SendFinalRound"/> for a driver that does not block (as <see cref="StartLiveRound"/>): the pending set is in flight from now.</summary>
    public RoundRequest StartFinalRound(long count)
    {
        Round++;
        (InFlight, InFlightRound) = (Pending, Round);
        _roundStart = _time.GetTimestamp();
        return new RoundRequest(Round, true, Pending, count, SkipZero: false, null);
    }

    /// <summary>The second half of <see cref="SendFinalRound"/>: the final round's statistics, its time since <see cref="StartFinalRound"/>.</summary>
    public RoundStats FinishFinalRound(RoundSent sent)
    {
        var duration = _time.GetElapsedTime(_roundStart);
        Count(sent);
        var stats = new RoundStats(Round, sent.Pages, sent.Bytes, duration, 0, sent.Bytes / Math.Max(duration.TotalSeconds, 1e-6), 0);
        _sender.EndRound(stats);
        return stats;
    }

    /// <summary>Adds the stop-and-copy to the rounds (and tells the observer): apart from sending it, so the engine can time the two.</summary>
    public void RecordFinalRound(RoundStats stats) => Record(stats, final: true, TimeSpan.Zero);

    /// <summary>
    /// After the engine reconnected to the destination's partial copy: of the pages in flight,
    /// those <paramref name="delivered"/> arrived; the others are pending again. Returns those
    /// (no delta or dedup reference may lean on them), or null when nothing was in flight. The
    /// next round sends every pending page.
    /// </summary>
    public PageBitmap? Reattached(PageBitmap delivered)
    {
        var lost = InFlight;
        if (lost is not null)
        {
            lost.AndNot(delivered);
            if (!ReferenceEquals(lost, Pending)) Pending.Or(lost);
            InFlight = null;
        }
        _sendNow.CopyFrom(Pending);
        _sendCount = Pending.Count();
        _deferred = 0;
        Round++;
        return lost;
    }

    /// <summary>Pages the next live round will send.</summary>
    public long NextRoundPages => _sendCount;

    private void Record(RoundStats s, bool final, TimeSpan estimatedDowntime)
    {
        var r = new RoundReport
        {
            Round = s.Round, Final = final, PagesSent = s.PagesSent, PagesDirtied = s.DirtyPagesAfter, BytesSent = s.BytesSent,
            DurationMs = s.Duration.TotalMilliseconds, BandwidthBytesPerSecond = s.BandwidthBytesPerSecond, DirtyRatePagesPerSecond = s.DirtyRatePagesPerSecond,
            PagesSkipped = s.PagesSkipped, PagesDeferred = s.PagesDeferred, Throttle = _brakes.ThrottleFraction, DirtyLimit = _brakes.DirtyRateLimit,
            EstimatedDowntimeMs = final ? 0 : Ms(estimatedDowntime),
        };
        _rounds.Add(r);
        _observer?.RoundCompleted(r);
    }

    internal static double Ms(TimeSpan t) => t == TimeSpan.MaxValue ? -1 : t.TotalMilliseconds;

    /// <summary>
    /// Why the rounds stalled, in one line an operator can act on: the estimate against the
    /// limit, the guest's dirty rate against what the link carried.
    /// </summary>
    public string StallSummary(TimeSpan downtimeLimit)
    {
        var d = Decision;
        var last = _rounds.Count > 0 ? _rounds[^1] : null;
        double seconds = _rounds.Sum(r => r.DurationMs) / 1000;
        double link = seconds > 0 ? _rounds.Sum(r => r.BytesSent) / seconds : 0;
        double dirty = last?.DirtyRatePagesPerSecond ?? 0;
        string estimate = d.EstimatedDowntime == TimeSpan.MaxValue ? "an unknown time" : $"an estimated {d.EstimatedDowntime.TotalMilliseconds:0} ms";
        return $"pre-copy stalled after round {Round} ({StopReasons.Name(d.Reason)}): a stop-and-copy now would pause the VM for {estimate}, over the downtime limit of {downtimeLimit.TotalMilliseconds:0} ms; " +
               $"the guest dirties {dirty:0} pages/s ({Units.Bytes((long)(dirty * GuestMemory.PageSize))}/s), the link carried {Units.Bytes((long)link)}/s";
    }
}
