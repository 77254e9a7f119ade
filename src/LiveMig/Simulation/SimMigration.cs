using LiveMig.Core;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Policies;
using LiveMig.Reporting;

namespace LiveMig.Simulation;

/// <summary>A modelled VM: its memory, vCPUs, what it writes and holds, its state's size, and where it runs now.</summary>
public sealed class SimVm
{
    public SimVm(string name, SimHost host, long pageCount, int vcpus, IDirtyProcess dirty, IContentModel content, long stateBytes, TimeProvider time, double startProgress = 0)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(pageCount, 1);
        ArgumentOutOfRangeException.ThrowIfNegative(stateBytes);
        Name = name;
        Host = host;
        PageCount = pageCount;
        Content = content;
        StateBytes = stateBytes;
        Guest = new SimGuest(time, dirty, vcpus, pageCount, startProgress, trackWritten: content.NeedsWrittenPages);
    }

    public string Name { get; }
    public SimHost Host { get; internal set; }
    public long PageCount { get; }
    public long MemoryBytes => PageCount * GuestMemory.PageSize;
    public IContentModel Content { get; }
    public long StateBytes { get; }
    /// <summary>The guest, for every migration of this VM in turn: it runs on wherever the VM is.</summary>
    public SimGuest Guest { get; }
    /// <summary>A migration of it is under way.</summary>
    public bool Migrating { get; internal set; }
    /// <summary>What the guest reads (null: reads not modelled); with its own seeded draws.</summary>
    public ReadModel? Reads { get; private set; }
    internal PageScatter? ReadDraws { get; private set; }

    /// <summary>Gives the guest reads (the hand model's <c>reads</c>), drawn from <paramref name="seed"/>.</summary>
    public SimVm WithReads(ReadModel? reads, ulong seed)
    {
        Reads = reads;
        ReadDraws = reads is null ? null : new PageScatter(seed);
        return this;
    }
}

/// <summary>How one simulated migration is to run: the engine's strategy, pre-copy and post-copy options and pipeline, and a bandwidth cap (the engine's rate limiter; 0: none).</summary>
public sealed record SimMigrationOptions
{
    public MigrationStrategy Strategy { get; init; } = MigrationStrategy.PreCopy;
    public PreCopyOptions PreCopy { get; init; } = new();
    /// <summary>Hybrid's budget, the push order (prepaging) and the push batch: the engine's own options.</summary>
    public PostCopyOptions PostCopy { get; init; } = new();
    /// <summary>The migration runs on the engine's post-copy path (PostCopyMigration): post-copy, hybrid, or pre-copy that may switch on a stall.</summary>
    public bool MaySwitch => Strategy != MigrationStrategy.PreCopy || PreCopy.OnStall == StallAction.PostCopy;
    public SimPipeline Pipeline { get; init; } = SimPipeline.Baseline;
    public double BandwidthCap { get; init; }
}

/// <summary>What became of a simulated migration (times in virtual seconds and milliseconds).</summary>
public sealed record SimMigrationResult
{
    public required string Vm { get; init; }
    public required string From { get; init; }
    public required string To { get; init; }
    /// <summary><c>precopy</c>, <c>postcopy</c> or <c>hybrid</c>, as asked.</summary>
    public string Strategy { get; init; } = "precopy";
    /// <summary><c>completed</c> or <c>aborted</c> (the rounds stalled and --on-stall said abort, or no brake was left).</summary>
    public required string Outcome { get; init; }
    public string? Error { get; init; }
    public double StartS { get; init; }
    public double TotalS { get; init; }
    public double DowntimeMs { get; init; }
    public double EstimatedDowntimeMs { get; init; }
    public long BytesOnWire { get; init; }
    public long MemoryBytes { get; init; }
    /// <summary>Rounds, the stop-and-copy included when there was one.</summary>
    public int Rounds { get; init; }
    public string StopReason { get; init; } = "";
    public long PagesSent { get; init; }
    public long PagesDeferred { get; init; }
    public double MaxThrottle { get; init; }
    public double MaxDirtyLimit { get; init; }
    public long? OperationsLost { get; init; }
    public IReadOnlyDictionary<string, long> PagesByEncoding { get; init; } = new Dictionary<string, long>();
    public IReadOnlyList<RoundReport> RoundDetails { get; init; } = [];
    public IReadOnlyList<string> Escalations { get; init; } = [];
    /// <summary>The migration switched to post-copy (post-copy, hybrid, or pre-copy's on-stall postcopy).</summary>
    public bool SwitchedToPostCopy { get; init; }
    /// <summary>Pages still to come at the switch to post-copy.</summary>
    public long PagesAtSwitch { get; init; }
    public long PagesPushed { get; init; }
    /// <summary>Demand faults: pages the guest touched at the destination before they arrived (each requested once).</summary>
    public long PagesRequested { get; init; }
    public long PagesPrepaged { get; init; }
    /// <summary>The faults' latency, microseconds (request, queue at the source, the page on the link, back).</summary>
    public LatencySummary? FaultLatencyUs { get; init; }
    /// <summary>vCPU-milliseconds spent waiting on faults (the degradation post-copy costs the guest).</summary>
    public double FaultWaitMs { get; init; }
    /// <summary>The guest's progress lost to those waits: <see cref="FaultWaitMs"/> ÷ its vCPUs (milliseconds of its work).</summary>
    public double GuestStallMs { get; init; }
    /// <summary>From Resumed to PostCopyDone (the push and the faults).</summary>
    public double PostCopyMs { get; init; }
    /// <summary>What the migration did when, for a timeline: handshake, each round, the stop-and-copy or the switch, the post-copy phase.</summary>
    [System.Text.Json.Serialization.JsonIgnore(Condition = System.Text.Json.Serialization.JsonIgnoreCondition.WhenWritingNull)]
    public IReadOnlyList<SimPhase>? Phases { get; init; }
}

/// <summary>A span of one migration's timeline, in virtual seconds from the scenario's start: <c>handshake</c>, <c>round</c> (with its number), <c>downtime</c> (the stop-and-copy or the post-copy switch), <c>post-copy</c>.</summary>
public sealed record SimPhase(string Kind, double StartS, double EndS, int Round = -1);

/// <summary>
/// One migration in the simulation, driven event by event: the engine's own
/// <see cref="RoundController"/> and round policy — <see cref="PreCopyPolicy"/> (every stop
/// condition, the on-stall choices, hot-page deferral, auto-converge and the dirty limit through
/// <see cref="SimGuest"/>'s brakes) or <see cref="HybridPolicy"/> — on the simulation's
/// <see cref="VirtualClock"/>, with <see cref="SimRoundSender"/> counting each round's bytes and
/// <see cref="FlowNetwork"/> carrying them. The sequence is the engine's (PreCopyMigration,
/// StopAndCopy, PostCopyMigration): handshake (a round trip; a second for the page-request
/// connection when the migration may switch to post-copy), tracking on, round 0 = the memory
/// present, live rounds (pages, then Sync: a round trip), and at the stop the pause, brakes
/// released, the final harvest, the final round and the VM state, then Prepare → Ready and
/// Commit → Resumed (two round trips); the downtime runs from the pause to Resumed. What the
/// engine does at the end of stalled rounds is done here too: pause anyway (on-stall pause
/// within the maximum downtime), abort (the VM runs on unslowed), or the switch to post-copy
/// (<see cref="SimPostCopy"/>), as hybrid always ends and pure post-copy starts (after a Sync
/// that provisions the destination).
/// </summary>
public sealed class SimMigration
{
    private readonly EventScheduler _scheduler;
    private readonly FlowNetwork _network;
    private readonly SimMigrationOptions _options;
    private readonly List<SimPhase> _phases = [];
    private RoundController? _controller;
    private SimRoundSender? _sender;
    private IPreCopyPolicy? _policy;
    private SimPostCopy? _postCopy;
    private long _startTs, _pauseTs, _roundTs;

    public SimMigration(EventScheduler scheduler, FlowNetwork network, SimVm vm, SimRoute route, SimMigrationOptions options)
    {
        if (route.From != vm.Host) throw new ArgumentException($"VM {vm.Name} runs on {vm.Host}, the route starts at {route.From}", nameof(route));
        _scheduler = scheduler;
        _network = network;
        Vm = vm;
        Route = route;
        _options = options;
    }

    public SimVm Vm { get; }
    public SimRoute Route { get; }
    public SimMigrationResult? Result { get; private set; }
    /// <summary>Called once the migration has ended, whatever its outcome (on the scheduler's thread).</summary>
    public event Action<SimMigration>? Ended;

    private VirtualClock Clock => _scheduler.Clock;
    private TimeSpan Rtt => Route.RoundTrip;

    /// <summary>Pure post-copy: no round at all (hybrid with a budget of no round is the same, as in the engine).</summary>
    private bool NoRounds => _options.Strategy == MigrationStrategy.PostCopy
        || _options.Strategy == MigrationStrategy.Hybrid && _options.PostCopy.Hybrid.MaxRounds <= 0;

    /// <summary>Begins now: Hello → HelloAck (and Attach → Attached of the page-request connection), then the rounds.</summary>
    public void Start()
    {
        if (Vm.Migrating) throw new InvalidOperationException($"VM {Vm.Name} is already migrating");
        if (Vm.Host != Route.From) throw new InvalidOperationException($"VM {Vm.Name} runs on {Vm.Host}, not on {Route.From}");
        Vm.Migrating = true;
        _startTs = _scheduler.Now;
        _scheduler.After(_options.MaySwitch ? Rtt * 2 : Rtt, NoRounds ? Provision : Setup);
    }

    /// <summary>Keep the timeline (<see cref="SimMigrationResult.Phases"/>); off, nothing is kept per round.</summary>
    public bool RecordPhases { get; init; }

    private void Phase(string kind, long from, int round = -1)
    {
        if (RecordPhases) _phases.Add(new SimPhase(kind, from / 1e9, _scheduler.NowSeconds, round));
    }

    private void Setup()
    {
        Phase("handshake", _startTs);
        _policy = _options.Strategy == MigrationStrategy.Hybrid
            ? new HybridPolicy(_options.PostCopy.Hybrid, _options.PreCopy, Clock)
            : new PreCopyPolicy(_options.PreCopy, Clock);
        _sender = new SimRoundSender(Vm.Content, _options.Pipeline, Vm.PageCount)
        {
            StateBytes = Vm.StateBytes,
            WrittenPages = Vm.Guest.EverWritten,
            LinkEstimate = _options.BandwidthCap > 0 ? Math.Min(_options.BandwidthCap, Route.BottleneckBytesPerSecond) : Route.BottleneckBytesPerSecond,
        };
        _controller = new RoundController(_policy, _sender, Vm.Guest, Vm.Guest, Clock) { CompactPageSets = true };
        _sender.Bandwidth = StateBandwidth;
        Vm.Guest.Start();
        var first = PageBitmap.Compact(Vm.PageCount);
        Vm.Guest.Process.Populated(first);
        _controller.Begin(first);
        NextRound();
    }

    /// <summary>Pure post-copy, as the engine: tracking on, the populated pages scanned, one Sync that provisions the destination, then the switch.</summary>
    private void Provision()
    {
        Vm.Guest.Start();
        _scheduler.After(Rtt, () =>
        {
            Phase("handshake", _startTs);
            Switch();
        });
    }

    /// <summary>What the VM state will see, as the engine has it: the cap, else what round 0 measured.</summary>
    private double StateBandwidth() => _options.BandwidthCap > 0 ? _options.BandwidthCap : _controller!.Rounds.Count > 0 ? _controller.Rounds[0].BandwidthBytesPerSecond : 0;

    /// <summary>The fastest a round's bytes can go from this sender: the encoder's pace and the cap.</summary>
    private double FlowCap(RoundSent sent)
    {
        double cap = _options.BandwidthCap > 0 ? _options.BandwidthCap : double.PositiveInfinity;
        double cpu = _sender!.LastCpuSeconds;
        return cpu > 0 && sent.Bytes > 0 ? Math.Min(cap, sent.Bytes / cpu) : cap;
    }

    private void NextRound()
    {
        _roundTs = _scheduler.Now;
        var r = _controller!.StartLiveRound();
        var sent = _sender!.SendRound(r.Round, false, r.Pages, r.Count, r.SkipZero, r.Rewritten, CancellationToken.None);
        _network.Start(Route, sent.Bytes, _ =>
        {
            long syncTs = _scheduler.Now;
            _scheduler.After(Rtt, () =>
            {
                _sender.Synced(Clock.GetElapsedTime(syncTs));
                Phase("round", _roundTs, r.Round);
                RoundDelivered(sent);
            });
        }, FlowCap(sent));
    }

    private void RoundDelivered(RoundSent sent)
    {
        var decision = _controller!.FinishLiveRound(sent);
        var last = _controller.Rounds[^1];
        if (last.BandwidthBytesPerSecond > 0 && last.BytesSent > 0) _sender!.LinkEstimate = last.BandwidthBytesPerSecond;
        if (!decision.StopAndCopy)
        {
            NextRound();
            return;
        }
        EndOfRounds(decision);
    }

    /// <summary>As PreCopyMigration.EndOfRounds and PostCopyMigration.PreCopyRounds: stop-and-copy, abort, or the switch to post-copy.</summary>
    private void EndOfRounds(PreCopyDecision d)
    {
        var c = _controller!;
        string stall = d.Stalled ? c.StallSummary(_options.PreCopy.DowntimeLimit) : "";
        switch (d.Ending)
        {
            case RoundsEnding.StopAndCopy:
                if (d.Stalled) c.Escalations.Add($"{stall}; paused anyway, within the maximum downtime of {_options.PreCopy.MaxDowntime?.TotalMilliseconds:0} ms");
                Pause();
                return;
            case RoundsEnding.PostCopy:
                if (d.Stalled) c.Escalations.Add($"{stall}; switched to post-copy");
                Switch();
                return;
            default:
                string why = $"{c.StallSummary(_options.PreCopy.DowntimeLimit)}; migration aborted, the VM keeps running on the source";
                c.Escalations.Add(why);
                c.ReleaseBrakes();
                Vm.Guest.Stop();
                End("aborted", why, downtime: 0);
                return;
        }
    }

    private void Pause()
    {
        var c = _controller!;
        _pauseTs = _scheduler.Now;
        Vm.Guest.Pause();
        c.ReleaseBrakes();
        long count = c.HarvestFinal();
        var r = c.StartFinalRound(count);
        var sent = _sender!.SendRound(r.Round, true, r.Pages, r.Count, r.SkipZero, null, CancellationToken.None);
        _network.Start(Route, sent.Bytes, _ =>
        {
            c.RecordFinalRound(c.FinishFinalRound(sent));
            _network.Start(Route, Vm.StateBytes, _ => _scheduler.After(Rtt * 2, Resumed), _options.BandwidthCap > 0 ? _options.BandwidthCap : double.PositiveInfinity);
        }, FlowCap(sent));
    }

    /// <summary>Commit → Resumed has come back: the VM runs at the destination.</summary>
    private void Resumed()
    {
        Phase("downtime", _pauseTs);
        MoveGuest();
        End("completed", null, downtime: Clock.GetElapsedTime(_pauseTs).TotalMilliseconds);
    }

    private void MoveGuest()
    {
        Vm.Guest.Stop();
        Vm.Host = Route.To;
        Vm.Guest.Resume();
    }

    /// <summary>
    /// The switch to post-copy, as PostCopyMigration.Switch: pause, and what the destination lacks —
    /// with rounds, their pending set after the brakes are released and the last harvest; without,
    /// every populated page and every page written since tracking began.
    /// </summary>
    private void Switch()
    {
        _pauseTs = _scheduler.Now;
        Vm.Guest.Pause();
        if (_controller is { } c)
        {
            c.ReleaseBrakes();
            c.HarvestFinal();
            _postCopy = new SimPostCopy(_scheduler, _network, Vm, Route, _options);
            _postCopy.Switch(c.Pending, c.Pending, skipZero: false, c.Round + 1, MoveGuest, PostCopyDone);
            return;
        }
        // Priced as pre-copy's round 0 prices the image (zero pages cost nothing); the image's holes are not to come.
        var image = new PageBitmap(Vm.PageCount);
        Vm.Guest.Process.Populated(image);
        var written = new PageBitmap(Vm.PageCount);
        Vm.Guest.Harvest(written);
        var pending = new PageBitmap(Vm.PageCount);
        pending.CopyFrom(image);
        ImageHoles.Remove(pending, Vm.Content.HoleShare, Vm.Guest.EverWritten);
        pending.Or(written);
        image.Or(written);
        _postCopy = new SimPostCopy(_scheduler, _network, Vm, Route, _options);
        _postCopy.Switch(pending, image, skipZero: true, 0, MoveGuest, PostCopyDone);
    }

    private void PostCopyDone()
    {
        var p = _postCopy!;
        if (RecordPhases)
        {
            _phases.Add(new SimPhase("downtime", _pauseTs / 1e9, p.ResumedTs / 1e9));
            _phases.Add(new SimPhase("post-copy", p.ResumedTs / 1e9, p.DoneTs / 1e9));
        }
        End("completed", null, downtime: Clock.GetElapsedTime(_pauseTs, p.ResumedTs).TotalMilliseconds);
    }

    private string StopReasonName => _controller is { } c
        ? StopReasons.Name(c.Decision.Reason)
        : StopReasons.Name(_options.Strategy == MigrationStrategy.Hybrid ? Policies.StopReason.RoundBudget : Policies.StopReason.Immediate);

    private void End(string outcome, string? error, double downtime)
    {
        var c = _controller;
        var rounds = c?.Rounds ?? [];
        var p = _postCopy;
        long bytes = rounds.Sum(r => r.BytesSent) + (p is not null ? p.BytesOnWire : outcome == "completed" ? Vm.StateBytes : 0);
        var live = rounds.LastOrDefault(r => !r.Final);
        var byEncoding = new Dictionary<string, double>(_sender?.PagesByEncoding ?? []);
        if (p is not null)
            foreach (var (k, v) in p.PagesByEncoding) byEncoding[k] = byEncoding.GetValueOrDefault(k) + v;
        Result = new SimMigrationResult
        {
            Vm = Vm.Name,
            From = Route.From.Name,
            To = Route.To.Name,
            Strategy = Migrations.Name(_options.Strategy),
            Outcome = outcome,
            Error = error,
            StartS = _startTs / 1e9,
            TotalS = Clock.GetElapsedTime(_startTs).TotalSeconds,
            DowntimeMs = downtime,
            EstimatedDowntimeMs = live?.EstimatedDowntimeMs ?? 0,
            BytesOnWire = bytes,
            MemoryBytes = Vm.MemoryBytes,
            Rounds = rounds.Count,
            StopReason = StopReasonName,
            PagesSent = (c?.PagesSent ?? 0) + (p is null ? 0 : p.PagesPushed + p.PagesRequested),
            PagesDeferred = c?.DeferredAtStop ?? 0,
            MaxThrottle = c?.MaxThrottle ?? 0,
            MaxDirtyLimit = c?.MaxDirtyLimit ?? 0,
            OperationsLost = c?.Meter.OperationsLost,
            PagesByEncoding = byEncoding.ToDictionary(kv => kv.Key, kv => (long)Math.Round(kv.Value)),
            RoundDetails = [.. rounds],
            Escalations = c is null ? [] : [.. c.Escalations],
            SwitchedToPostCopy = p is not null,
            PagesAtSwitch = p?.PagesAtSwitch ?? 0,
            PagesPushed = p?.PagesPushed ?? 0,
            PagesRequested = p?.PagesRequested ?? 0,
            PagesPrepaged = p?.PagesPrepaged ?? 0,
            FaultLatencyUs = p?.FaultLatency(),
            FaultWaitMs = (p?.WaitSeconds ?? 0) * 1000,
            GuestStallMs = (p?.WaitSeconds ?? 0) * 1000 / Vm.Guest.Vcpus,
            PostCopyMs = p is null ? 0 : Clock.GetElapsedTime(p.ResumedTs, p.DoneTs).TotalMilliseconds,
            Phases = RecordPhases ? [.. _phases] : null,
        };
        // The controller's page sets, the policy's tracker and the post-copy bitmaps are the memory of a migration: let them go.
        p?.Dispose();
        _postCopy = null;
        _controller = null;
        _sender = null;
        _policy = null;
        Vm.Migrating = false;
        Ended?.Invoke(this);
    }
}
