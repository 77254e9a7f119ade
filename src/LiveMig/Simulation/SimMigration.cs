using LiveMig.Core;
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
}

/// <summary>How one simulated migration is to run: the engine's pre-copy options and pipeline, and a bandwidth cap (the engine's rate limiter; 0: none).</summary>
public sealed record SimMigrationOptions
{
    public PreCopyOptions PreCopy { get; init; } = new();
    public SimPipeline Pipeline { get; init; } = SimPipeline.Baseline;
    public double BandwidthCap { get; init; }
}

/// <summary>What became of a simulated migration (times in virtual seconds and milliseconds).</summary>
public sealed record SimMigrationResult
{
    public required string Vm { get; init; }
    public required string From { get; init; }
    public required string To { get; init; }
    /// <summary><c>completed</c>, <c>aborted</c> (the rounds stalled and --on-stall said abort, or no brake was left), or <c>postcopy-not-simulated</c> (the policy asked for the switch to post-copy, which the simulator does not model yet).</summary>
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
}

/// <summary>
/// One pre-copy migration in the simulation, driven event by event: the engine's own
/// <see cref="RoundController"/> and <see cref="PreCopyPolicy"/> (every stop condition, the
/// on-stall choices, hot-page deferral, auto-converge and the dirty limit through
/// <see cref="SimGuest"/>'s brakes) on the simulation's <see cref="VirtualClock"/>, with
/// <see cref="SimRoundSender"/> counting each round's bytes and <see cref="FlowNetwork"/>
/// carrying them. The sequence is the engine's (PreCopyMigration, StopAndCopy): handshake (a
/// round trip), tracking on, round 0 = the memory present, live rounds (pages, then Sync: a
/// round trip), and at the stop the pause, brakes released, the final harvest, the final round
/// and the VM state, then Prepare → Ready and Commit → Resumed (two round trips); the downtime
/// runs from the pause to Resumed. What the engine does at the end of stalled rounds is done
/// here too: pause anyway (on-stall pause within the maximum downtime), abort (the VM runs on
/// unslowed), or post-copy — which ends the simulated migration unfinished, as post-copy is
/// not modelled yet.
/// </summary>
public sealed class SimMigration
{
    private readonly EventScheduler _scheduler;
    private readonly FlowNetwork _network;
    private readonly SimMigrationOptions _options;
    private RoundController? _controller;
    private SimRoundSender? _sender;
    private PreCopyPolicy? _policy;
    private long _startTs, _pauseTs;

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

    /// <summary>Begins now: Hello → HelloAck, then the rounds.</summary>
    public void Start()
    {
        if (Vm.Migrating) throw new InvalidOperationException($"VM {Vm.Name} is already migrating");
        if (Vm.Host != Route.From) throw new InvalidOperationException($"VM {Vm.Name} runs on {Vm.Host}, not on {Route.From}");
        Vm.Migrating = true;
        _startTs = _scheduler.Now;
        _scheduler.After(Rtt, Setup);
    }

    private void Setup()
    {
        _policy = new PreCopyPolicy(_options.PreCopy, Clock);
        _sender = new SimRoundSender(Vm.Content, _options.Pipeline, Vm.PageCount)
        {
            StateBytes = Vm.StateBytes,
            WrittenPages = Vm.Guest.EverWritten,
            LinkEstimate = _options.BandwidthCap > 0 ? Math.Min(_options.BandwidthCap, Route.BottleneckBytesPerSecond) : Route.BottleneckBytesPerSecond,
        };
        _controller = new RoundController(_policy, _sender, Vm.Guest, Vm.Guest, Clock);
        _sender.Bandwidth = StateBandwidth;
        Vm.Guest.Start();
        var first = new PageBitmap(Vm.PageCount);
        Vm.Guest.Process.Populated(first);
        _controller.Begin(first);
        NextRound();
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
        var r = _controller!.StartLiveRound();
        var sent = _sender!.SendRound(r.Round, false, r.Pages, r.Count, r.SkipZero, r.Rewritten, CancellationToken.None);
        _network.Start(Route, sent.Bytes, _ =>
        {
            long syncTs = _scheduler.Now;
            _scheduler.After(Rtt, () =>
            {
                _sender.Synced(Clock.GetElapsedTime(syncTs));
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

    /// <summary>As PreCopyMigration.EndOfRounds: the rounds stalled short of the downtime limit end as on-stall says.</summary>
    private void EndOfRounds(PreCopyDecision d)
    {
        var c = _controller!;
        if (d.Ending == RoundsEnding.StopAndCopy)
        {
            if (d.Stalled) c.Escalations.Add($"{c.StallSummary(_options.PreCopy.DowntimeLimit)}; paused anyway, within the maximum downtime of {_options.PreCopy.MaxDowntime?.TotalMilliseconds:0} ms");
            Pause();
            return;
        }
        string stall = c.StallSummary(_options.PreCopy.DowntimeLimit);
        bool postCopy = d.Ending == RoundsEnding.PostCopy;
        string why = postCopy
            ? $"{stall}; the policy asked to switch to post-copy, which the simulator does not model yet"
            : $"{stall}; migration aborted, the VM keeps running on the source";
        c.Escalations.Add(why);
        c.ReleaseBrakes();
        Vm.Guest.Stop();
        End(postCopy ? "postcopy-not-simulated" : "aborted", why, downtime: 0);
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
        Vm.Guest.Stop();
        Vm.Host = Route.To;
        Vm.Guest.Resume();
        End("completed", null, downtime: Clock.GetElapsedTime(_pauseTs).TotalMilliseconds);
    }

    private void End(string outcome, string? error, double downtime)
    {
        var c = _controller!;
        var rounds = c.Rounds;
        long bytes = rounds.Sum(r => r.BytesSent) + (outcome == "completed" ? Vm.StateBytes : 0);
        var live = rounds.LastOrDefault(r => !r.Final);
        Result = new SimMigrationResult
        {
            Vm = Vm.Name,
            From = Route.From.Name,
            To = Route.To.Name,
            Outcome = outcome,
            Error = error,
            StartS = _startTs / 1e9,
            TotalS = Clock.GetElapsedTime(_startTs).TotalSeconds,
            DowntimeMs = downtime,
            EstimatedDowntimeMs = live?.EstimatedDowntimeMs ?? 0,
            BytesOnWire = bytes,
            MemoryBytes = Vm.MemoryBytes,
            Rounds = rounds.Count,
            StopReason = StopReasons.Name(c.Decision.Reason),
            PagesSent = c.PagesSent,
            PagesDeferred = c.DeferredAtStop,
            MaxThrottle = c.MaxThrottle,
            MaxDirtyLimit = c.MaxDirtyLimit,
            OperationsLost = c.Meter.OperationsLost,
            PagesByEncoding = _sender!.PagesByEncoding.ToDictionary(kv => kv.Key, kv => (long)Math.Round(kv.Value)),
            RoundDetails = [.. rounds],
            Escalations = [.. c.Escalations],
        };
        // The controller's page sets and the policy's tracker are the memory of a migration: let them go.
        _controller = null;
        _sender = null;
        _policy = null;
        Vm.Migrating = false;
        Ended?.Invoke(this);
    }
}
