using LiveMig.Simulation;

namespace LiveMig.Mtd;

/// <summary>What one defensive move costs, from the simulator's migration of the victim.</summary>
/// <param name="TotalS">Start to resume at the destination (the victim stays on the source meanwhile).</param>
/// <param name="DegradationS">The application's loss, in seconds of its work: the downtime plus the work that throttling (auto-converge, dirty limit) took away.</param>
/// <param name="Completed">False: the migration aborted, the VM stays where it was.</param>
public sealed record MoveCost(double TotalS, double DowntimeMs, long Bytes, double DegradationS, bool Completed, string Outcome, int Rounds)
{
    public double Metric(CostMetric m) => m switch
    {
        CostMetric.Bytes => Bytes,
        CostMetric.Downtime => DowntimeMs,
        CostMetric.Degradation => DegradationS,
        _ => 1,
    };
}

/// <summary>
/// The cost of moving the victim now: a <see cref="SimMigration"/> — the engine's own
/// RoundController and PreCopyPolicy on a VirtualClock, the simulator's network, guest,
/// content and codec models — of the victim with its workload as it is at that moment, over
/// the link the move takes, with the scenario's migration options. The workload's state is a
/// phase of its hand model (the phase in force then, held for the migration's length) or, for a
/// recorded trace, the replay from the nearest <see cref="VictimSpec.CostStep"/> offset. Each
/// (phase or offset, link) is simulated once and cached: a sweep of thousands of moves runs a
/// handful of migrations.
/// </summary>
public sealed class MoveCostModel
{
    private readonly VictimSpec _victim;
    private readonly ulong _seed;
    private readonly Dictionary<(int State, LinkModel Link), MoveCost> _cache = [];
    private readonly double _traceSeconds;

    public MoveCostModel(VictimSpec victim, ulong seed)
    {
        _victim = victim;
        _seed = seed;
        if (victim.Trace is { } path) _traceSeconds = Math.Max(TraceCache.Load(path).End.Duration.TotalSeconds, 1e-3);
        States = victim.Trace is null ? victim.Phases!.Count : Math.Max(1, (int)Math.Ceiling(_traceSeconds / victim.CostStep.TotalSeconds));
    }

    /// <summary>The distinct workload states a move can start in (phases, or trace offsets).</summary>
    public int States { get; }

    /// <summary>Migrations simulated so far (the cache's misses).</summary>
    public int Simulated => _cache.Count;

    /// <summary>The workload's state at virtual second <paramref name="t"/> of the scenario.</summary>
    public int StateAt(double t)
    {
        if (_victim.Trace is not null) return (int)Math.Min(States - 1, t % _traceSeconds / _victim.CostStep.TotalSeconds);
        var phases = _victim.Phases!;
        double at = _victim.Cycle is { } c ? t % c.TotalSeconds : t;
        int i = phases.Count - 1;
        while (i > 0 && phases[i].At > at) i--;
        return i;
    }

    public MoveCost At(double t, LinkModel link) => Cost(StateAt(t), link);

    /// <summary>The least <paramref name="metric"/> of a move over every state of the workload.</summary>
    public double Cheapest(LinkModel link, CostMetric metric) => Enumerable.Range(0, States).Min(s => Cost(s, link).Metric(metric));

    public MoveCost Cost(int state, LinkModel link)
    {
        if (_cache.TryGetValue((state, link), out var c)) return c;
        c = Simulate(state, link);
        _cache[(state, link)] = c;
        return c;
    }

    private MoveCost Simulate(int state, LinkModel link)
    {
        var scheduler = new EventScheduler();
        var network = new FlowNetwork(scheduler);
        SimHost from = new("source"), to = new("destination");
        var route = new SimRoute(from, to, [new SimLink("link", link.BytesPerSecond, link.Latency)]);
        var (vm, rate) = Victim(state, from, scheduler);
        var migration = new SimMigration(scheduler, network, vm, route, _victim.Migration);
        scheduler.At(0, migration.Start);
        scheduler.Run(until: EventScheduler.Nanoseconds(TimeSpan.FromDays(1)), maxEvents: 50_000_000);
        var r = migration.Result ?? throw new ArgumentException($"the victim's migration over a {Units.Rate(link.BytesPerSecond)} link does not end within a day of virtual time; the model cannot price a move");
        bool done = r.Outcome == "completed";
        double lostS = r.OperationsLost is { } lost && rate > 0 ? lost / rate : 0;
        lostS += r.GuestStallMs / 1000; // post-copy: the work the guest did not do while its vCPUs waited for pages
        return new MoveCost(r.TotalS, done ? r.DowntimeMs : 0, r.BytesOnWire, (done ? r.DowntimeMs / 1000 : 0) + lostS, done, r.Outcome, r.Rounds);
    }

    /// <summary>The victim as it is in that state: a constant dirty model of the phase, or the trace replayed from the offset. Its write rate converts the work throttling took away into seconds.</summary>
    private (SimVm Vm, double Rate) Victim(int state, SimHost host, EventScheduler scheduler)
    {
        var v = _victim;
        if (v.Trace is { } path)
        {
            var trace = TraceCache.Load(path);
            double offset = state * v.CostStep.TotalSeconds;
            var process = new TraceDirtyProcess(trace, loop: true, offset);
            double rate = trace.End.Duration.TotalSeconds > 0 ? trace.Intervals.Skip(1).Sum(i => (double)i.Pages.Length) / trace.End.Duration.TotalSeconds : 0;
            return (new SimVm("victim", host, v.Pages, v.Vcpus, process, process, v.StateBytes, scheduler.Clock), rate);
        }
        var phase = v.Phases![state];
        var dirty = new DirtyModel(v.Pages, [phase with { At = 0 }], _seed ^ (ulong)state * 0x9E3779B97F4A7C15UL);
        return (new SimVm("victim", host, v.Pages, v.Vcpus, dirty, v.Content!, v.StateBytes, scheduler.Clock), phase.Rate);
    }
}
