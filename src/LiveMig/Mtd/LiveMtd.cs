using System.Diagnostics;
using System.Net;
using LiveMig.Engine;
using LiveMig.Qemu;
using LiveMig.Reporting;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Mtd;

/// <summary>How <see cref="LiveMtd"/> keeps a VM moving: the VM, the agents, the schedule and when to stop.</summary>
public sealed record LiveMtdOptions
{
    /// <summary>The built-in VM; its workload must be <c>kv</c> (a client outside it keeps using it). With <see cref="Qemu"/>: its name only.</summary>
    public required VmConfig Vm { get; init; }
    /// <summary>
    /// Move a QEMU guest instead: the boot-sector guest (guests/bootsector), which checks its own
    /// memory on every pass; the agents receive it with <see cref="QemuHost"/>'s settings.
    /// </summary>
    public QemuVmSpec? Qemu { get; init; }
    public QemuHostOptions? QemuHost { get; init; }
    /// <summary>The Linux guest's redis port (guests/linux).</summary>
    public const int RedisPort = 6379;

    /// <summary>How long after a move the QEMU guest has to report progress on the destination.</summary>
    public TimeSpan GuestProgressBound { get; init; } = TimeSpan.FromSeconds(30);
    public MigrationOptions Migration { get; init; } = new();
    /// <summary>Agents (in-process <see cref="MigrationListener"/>s on 127.0.0.1, real TCP): at least 3.</summary>
    public int Agents { get; init; } = 3;
    /// <summary>A move every this long (from one move's start to the next's; a move that takes longer is followed at once).</summary>
    public TimeSpan? Interval { get; init; }
    /// <summary>Or moves as a Poisson process of this mean interval.</summary>
    public TimeSpan? PoissonMean { get; init; }
    /// <summary>Stop after this many moves, or after this long (whichever is given; both: the first reached).</summary>
    public int? Moves { get; init; }
    public TimeSpan? Duration { get; init; }
    /// <summary>Seeds the schedule (Poisson) and the choice of each destination among the other agents.</summary>
    public ulong Seed { get; init; } = 1;
    public TimeSpan Warmup { get; init; } = TimeSpan.FromMilliseconds(300);

    public void Check()
    {
        if (Agents < 3 || Agents > 64) throw new ArgumentException($"agents: {Agents}; 3 to 64 (a VM moving between two hosts only would go back to where the attacker is)");
        if ((Interval is null) == (PoissonMean is null)) throw new ArgumentException("give the schedule: an interval or a Poisson mean (one of them)");
        if ((Interval ?? PoissonMean)!.Value < TimeSpan.Zero) throw new ArgumentException("the interval must not be negative");
        if (Moves is null && Duration is null) throw new ArgumentException("give when to stop: a number of moves or a duration");
        if (Moves is < 1 or > 1_000_000) throw new ArgumentException("moves: 1 to 1,000,000");
        if (Duration is { } d && (d <= TimeSpan.Zero || d > TimeSpan.FromDays(30))) throw new ArgumentException("duration: more than 0, at most 30 days");
        if (Qemu is { } q)
        {
            if (q.Error("qemu") is { } why) throw new ArgumentException(why);
            if (q.Kernel is not null && !q.Forward.Contains(RedisPort))
                throw new ArgumentException($"a Linux guest in mtd run needs its redis port forwarded (forward {RedisPort}): the client keeps using it through the moves");
            return;
        }
        if (WorkloadSpec.Parse(Vm.Workload).Name != "kv") throw new ArgumentException($"the workload must be kv (a client keeps using the VM's key-value store throughout), not '{Vm.Workload}'");
    }
}

/// <summary>One move: where, what the engine's report says, what the client saw while it ran.</summary>
public sealed record LiveMove
{
    public int Index { get; init; }
    public required string From { get; init; }
    public required string To { get; init; }
    public required string MigrationId { get; init; }
    /// <summary>Seconds since the run began, at the move's start.</summary>
    public double StartS { get; init; }
    public double TotalMs { get; init; }
    public double DowntimeMs { get; init; }
    public long BytesOnWire { get; init; }
    public int Rounds { get; init; }
    public bool Verified { get; init; }
    public string Outcome { get; init; } = "completed";
    public string? Error { get; init; }
    /// <summary>The client's requests answered while the move ran, its errors, the longest of them (the downtime it saw) and the longest gap between replies (the Linux guest's redis client: its replies, errors — a connection broken by the move counts — and longest gap).</summary>
    public long ClientRequests { get; init; }
    public long ClientErrors { get; init; }
    public double ClientMaxLatencyMs { get; init; }
    public double ClientLongestGapMs { get; init; }
    /// <summary>A QEMU guest: the passes its self-check made from before the move to its first report after it, and the stale or lost pages it found since the last move.</summary>
    public long GuestPasses { get; init; }
    public long GuestErrors { get; init; }
}

/// <summary>What the monitor saw of the agents' registries: the VM on exactly one host at every look.</summary>
public sealed record HostChecks
{
    public long Looks { get; init; }
    /// <summary>Looks at which two agents ran the VM at once (each look reads every agent twice; a host counts as running only if both reads say so, so a count of two is real).</summary>
    public long TwoRunning { get; init; }
    /// <summary>Looks at which no agent held the VM nor was receiving it.</summary>
    public long Lost { get; init; }
    /// <summary>Looks at which none ran it: inside a switch-over (the downtime).</summary>
    public long NoneRunning { get; init; }
    /// <summary>Looks after a move at which the VM was not exactly on its destination (held there, running, and on no other agent).</summary>
    public long WrongAfterMove { get; init; }
}

public sealed record LiveMtdResult
{
    public required string Vm { get; init; }
    public required IReadOnlyList<string> Agents { get; init; }
    public required IReadOnlyList<LiveMove> Moves { get; init; }
    public int Completed { get; init; }
    public int Failed { get; init; }
    public double ElapsedS { get; init; }
    public double TotalDowntimeMs { get; init; }
    public double MaxDowntimeMs { get; init; }
    public long TotalBytes { get; init; }
    /// <summary>The kv client's view (built-in VM), or null for a QEMU guest.</summary>
    public KvClientStats? Client { get; init; }
    /// <summary>The boot-sector guest's own view (QEMU guest), or null for the built-in VM.</summary>
    public GuestChecks? Guest { get; init; }
    /// <summary>The redis client's view (the Linux QEMU guest), or null.</summary>
    public RedisChecks? Redis { get; init; }
    public required HostChecks Checks { get; init; }
    /// <summary>The workload's own invariant, checked on the VM at the end where it is.</summary>
    public string? InvariantBroken { get; init; }
    /// <summary>Why the run stopped early (a failed move), or null.</summary>
    public string? Stopped { get; init; }

    /// <summary>Every move verified and completed, no request lost or answered wrong, the VM on exactly one host at every look.</summary>
    public bool Clean => Failed == 0 && Moves.All(m => m.Verified)
                         && (Client is null || Client is { Errors: 0, Mismatches: 0, Failure: null }) && (Guest is null || Guest is { Errors: 0, Stalls: 0 })
                         && (Redis is null || Redis is { WrongAnswers: 0, KeysMissing: 0, KeysWrong: 0, Stalls: 0 }) && (Client ?? Guest ?? (object?)Redis) is not null
                         && Checks is { TwoRunning: 0, Lost: 0, WrongAfterMove: 0 } && InvariantBroken is null && Stopped is null;
}

/// <summary>
/// Moving target defence for real: a built-in VM with the <c>kv</c> workload (or the boot-sector
/// QEMU guest), moved on a schedule between agents — in-process <see cref="MigrationListener"/>s
/// on loopback TCP, the real engine — each move the agent's own onward migration
/// (<see cref="VmRegistry.MigrateAway"/>, verified), while a <see cref="KvClient"/> keeps using the
/// VM's store through its one address (<see cref="KvEndpoint"/>, re-attached to the VM where it
/// resumes, like the gratuitous ARP after a migration), or the QEMU guest's own check reports on
/// each destination (<see cref="BootSectorWitness"/>). A monitor thread reads the agents' registries about every millisecond: the VM
/// must never run on two of them and never be on none. A failed move leaves the VM where it was
/// (the engine's promise) and ends the run.
/// </summary>
public sealed class LiveMtd : IDisposable
{
    private readonly LiveMtdOptions _o;
    private readonly IMtdWitness _witness;
    private readonly List<MigrationListener> _agents = [];
    private readonly CancellationTokenSource _stopMonitor = new();
    private long _looks, _twoRunning, _lost, _noneRunning, _wrongAfterMove;

    public LiveMtd(LiveMtdOptions options)
    {
        options.Check();
        _o = options;
        var qemu = options.Qemu is null ? null : new QemuVmFactory(options.QemuHost ?? new QemuHostOptions());
        _witness = options.Qemu switch
        {
            null => new KvWitness(options.Seed),
            { Kernel: not null } => new RedisWitness(() => RedisPorts(qemu!), options.GuestProgressBound),
            _ => new BootSectorWitness(options.GuestProgressBound),
        };
        IReadOnlyList<IVmFactory> factories = qemu is null ? IVmFactory.Defaults : [BuiltInVmFactory.Instance, qemu];
        for (int i = 0; i < options.Agents; i++)
        {
            var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions
            {
                DirtyLog = options.Vm.DirtyLog,
                Security = options.Migration.Security,
                VmFactories = factories,
                BeforeResume = _witness.Arrived,
            });
            _agents.Add(listener);
            listener.Start();
        }
    }

    /// <summary>The agents, for tests (e.g. to stop one and see a move to it fail).</summary>
    internal IReadOnlyList<MigrationListener> Agents => _agents;

    public IReadOnlyList<string> AgentNames => [.. _agents.Select(a => $"127.0.0.1:{a.Port}")];

    /// <summary>Runs the schedule; <paramref name="moved"/> hears of each move as it ends (on this thread).</summary>
    public LiveMtdResult Run(Action<LiveMove>? moved = null, CancellationToken cancel = default)
    {
        IVirtualMachine vm = StartVm();
        _agents[0].Registry.Add(vm); // it starts on agent 0 (the agent owns it from now on)
        _witness.Start(vm);
        int at = 0; // the agent the VM is on
        var monitor = new Thread(Monitor) { IsBackground = true, Name = "mtd-monitor" };
        monitor.Start();
        var moves = new List<LiveMove>();
        string? stopped = null;
        var rng = new Xoshiro256(_o.Seed);
        var clock = Stopwatch.StartNew();
        try
        {
            cancel.WaitHandle.WaitOne(_o.Warmup);
            double nextS = clock.Elapsed.TotalSeconds;
            while (!cancel.IsCancellationRequested && (_o.Moves is not { } n || moves.Count < n) && (_o.Duration is not { } d || clock.Elapsed < d))
            {
                nextS += _o.Interval is { } i ? i.TotalSeconds : -_o.PoissonMean!.Value.TotalSeconds * Math.Log(1 - rng.NextDouble());
                double wait = nextS - clock.Elapsed.TotalSeconds;
                if (_o.Duration is { } dd) wait = Math.Min(wait, dd.TotalSeconds - clock.Elapsed.TotalSeconds);
                if (wait > 0 && cancel.WaitHandle.WaitOne(TimeSpan.FromSeconds(wait))) break; // the schedule's pause (cancellable), not a synchronisation
                if (_o.Duration is { } d2 && clock.Elapsed >= d2) break;
                int to = OtherAgent(at, ref rng);
                var move = Move(vm.Name, at, to, moves.Count, clock, cancel);
                moves.Add(move);
                moved?.Invoke(move);
                if (move.Outcome != "completed")
                {
                    stopped = $"move {move.Index} from {move.From} to {move.To} failed ({move.Error}); the VM keeps running on {move.From}";
                    break;
                }
                if (!move.Verified)
                {
                    stopped = $"move {move.Index} was not verified";
                    at = to;
                    break;
                }
                at = to;
                if (!ExactlyOn(vm.Name, to)) Interlocked.Increment(ref _wrongAfterMove);
            }
        }
        finally
        {
            _stopMonitor.Cancel();
            monitor.Join();
        }
        _witness.Stop();
        string? broken = CheckInvariant(vm.Name, at);
        var done = moves.Where(m => m.Outcome == "completed").ToList();
        return new LiveMtdResult
        {
            Vm = vm.Name, Agents = AgentNames, Moves = moves, Completed = done.Count, Failed = moves.Count - done.Count, ElapsedS = clock.Elapsed.TotalSeconds,
            TotalDowntimeMs = done.Sum(m => m.DowntimeMs), MaxDowntimeMs = done.Select(m => m.DowntimeMs).DefaultIfEmpty(0).Max(), TotalBytes = moves.Sum(m => m.BytesOnWire),
            Client = (_witness as KvWitness)?.Stats, Guest = (_witness as BootSectorWitness)?.Checks, Redis = (_witness as RedisWitness)?.Checks, InvariantBroken = broken, Stopped = stopped,
            Checks = new HostChecks { Looks = _looks, TwoRunning = _twoRunning, Lost = _lost, NoneRunning = _noneRunning, WrongAfterMove = _wrongAfterMove },
        };
    }

    /// <summary>The host ports forwarded to the guest's redis: the QEMU that runs it first, then any QEMU waiting for it to arrive.</summary>
    private List<int> RedisPorts(QemuVmFactory factory)
    {
        var ports = new List<int>();
        foreach (var a in _agents)
            if (a.Registry.Find(_o.Vm.Name) is QemuVm { Process: var p } && p.ForwardedPorts.TryGetValue(LiveMtdOptions.RedisPort, out int port)) ports.Add(port);
        foreach (var p in factory.WaitingProcesses)
            if (p.ForwardedPorts.TryGetValue(LiveMtdOptions.RedisPort, out int port) && !ports.Contains(port)) ports.Add(port);
        return ports;
    }

    /// <summary>The VM that moves: the built-in kv VM, or the QEMU guest (started here, its first report awaited by the witness).</summary>
    private IVirtualMachine StartVm()
    {
        if (_o.Qemu is { } spec) return QemuVm.Start(_o.Vm.Name, spec, _o.QemuHost);
        var vm = BuiltInVm.Create(_o.Vm);
        vm.Start();
        return vm;
    }

    private int OtherAgent(int at, ref Xoshiro256 rng)
    {
        int k = (int)rng.NextBelow(_agents.Count - 1);
        return k >= at ? k + 1 : k;
    }

    /// <summary>One move by the agent's onward migration; the service's view: the client's replies that arrived meanwhile, or the guest's first report after it.</summary>
    private LiveMove Move(string name, int from, int to, int index, Stopwatch clock, CancellationToken cancel)
    {
        double startS = clock.Elapsed.TotalSeconds;
        _witness.BeforeMove();
        long t0 = Stopwatch.GetTimestamp();
        MigrationReport report;
        string? error = null;
        try { report = _agents[from].Registry.MigrateAway(name, _o.Migration, "127.0.0.1", _agents[to].Port, cancel: cancel); }
        catch (MigrationFailedException e)
        {
            report = e.Report;
            error = e.Message;
        }
        var where = _agents[error is null ? to : from].Registry;
        var seen = _witness.Moved(t0, Stopwatch.GetTimestamp(), () => where.Find(name));
        bool guest = _witness is BootSectorWitness;
        return new LiveMove
        {
            Index = index, From = AgentNames[from], To = AgentNames[to], MigrationId = report.MigrationId, StartS = startS,
            TotalMs = report.TotalTimeMs, DowntimeMs = report.DowntimeMs, BytesOnWire = report.BytesOnWire, Rounds = report.Rounds.Count,
            Verified = report.Verified == true, Outcome = error is null ? report.Outcome : "failed", Error = error ?? report.Error,
            ClientRequests = guest ? 0 : seen.Requests, ClientErrors = guest ? 0 : seen.Errors, ClientMaxLatencyMs = seen.MaxLatencyMs, ClientLongestGapMs = seen.LongestGapMs,
            GuestPasses = guest ? seen.Requests : 0, GuestErrors = guest ? seen.Errors : 0,
        };
    }

    /// <summary>Held and running by agent <paramref name="on"/> only.</summary>
    private bool ExactlyOn(string name, int on) =>
        _agents.Select((a, i) => (Vm: a.Registry.Find(name), i)).All(x => x.i == on ? x.Vm is { State: VmRunState.Running } : x.Vm is null);

    /// <summary>
    /// Looks at every agent's registry about once a millisecond until stopped. Two passes per look:
    /// a host counts as running the VM only if both passes saw it running, so that two such hosts
    /// X before Y prove an instant with both running (X's first read &lt; Y's first &lt; X's second).
    /// </summary>
    private void Monitor()
    {
        int n = _agents.Count;
        var first = new bool[n];
        string name = _o.Vm.Name;
        while (!_stopMonitor.IsCancellationRequested)
        {
            bool held = false;
            for (int i = 0; i < n; i++)
            {
                var vm = _agents[i].Registry.Find(name);
                first[i] = vm is { State: VmRunState.Running };
                held |= vm is not null || Arriving(_agents[i].Registry, name);
            }
            int running = 0;
            for (int i = 0; i < n; i++)
            {
                var vm = _agents[i].Registry.Find(name);
                if (first[i] && vm is { State: VmRunState.Running }) running++;
                held |= vm is not null || Arriving(_agents[i].Registry, name);
            }
            _looks++;
            if (running > 1) Interlocked.Increment(ref _twoRunning);
            if (running == 0) Interlocked.Increment(ref _noneRunning);
            if (!held) Interlocked.Increment(ref _lost);
            _stopMonitor.Token.WaitHandle.WaitOne(1);
        }
    }

    /// <summary>A migration bringing the VM in is under way there (between its Resumed and its registration the VM runs there unlisted).</summary>
    private static bool Arriving(VmRegistry r, string name) => r.List().Migrations.Any(m => m.Role == "destination" && m.VmName == name);

    private string? CheckInvariant(string name, int at)
    {
        var vm = _agents[at].Registry.Find(name);
        if (vm is null) return $"the VM is not on {AgentNames[at]} at the end";
        vm.Pause();
        try { return vm.CheckInvariant(); }
        finally { vm.Resume(); }
    }

    public void Dispose()
    {
        _stopMonitor.Cancel();
        foreach (var a in _agents) a.Dispose();
        _witness.Dispose();
    }
}
