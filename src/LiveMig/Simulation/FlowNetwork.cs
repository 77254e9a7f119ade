namespace LiveMig.Simulation;

/// <summary>A host: an end of routes. Hosts have no modelled resources of their own yet (CPU, memory).</summary>
public sealed class SimHost(string name)
{
    public string Name { get; } = name;
    public override string ToString() => Name;
}

/// <summary>
/// One pipe of the network: its capacity is shared by every flow that crosses it, whichever way
/// (a full-duplex cable whose two directions carry independent traffic is two links). Its
/// latency is one way.
/// </summary>
public sealed class SimLink
{
    internal readonly List<Flow> Flows = [];
    // Scratch of the max-min allocation.
    internal double FrozenRate;
    internal int Unfrozen;

    public SimLink(string name, double bytesPerSecond, TimeSpan latency)
    {
        if (!(bytesPerSecond > 0) || double.IsInfinity(bytesPerSecond)) throw new ArgumentOutOfRangeException(nameof(bytesPerSecond), bytesPerSecond, "a link's bandwidth must be a positive number of bytes/s");
        if (latency < TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(latency), latency, "must not be negative");
        Name = name;
        BytesPerSecond = bytesPerSecond;
        Latency = latency;
    }

    public string Name { get; }
    public double BytesPerSecond { get; }
    public TimeSpan Latency { get; }
    /// <summary>Bytes the link has carried so far (all flows).</summary>
    public double BytesCarried { get; internal set; }
    /// <summary>Flows crossing it now.</summary>
    public int ActiveFlows => Flows.Count;
    /// <summary>The rate it carries now, the sum of its flows' rates.</summary>
    public double CurrentRate => Flows.Sum(f => f.Rate);
    public override string ToString() => Name;
}

/// <summary>The links a flow between two hosts crosses, in order; its latency is theirs added up.</summary>
public sealed class SimRoute
{
    public SimRoute(SimHost from, SimHost to, IReadOnlyList<SimLink> links)
    {
        if (links.Count == 0) throw new ArgumentException($"the route from {from} to {to} crosses no link", nameof(links));
        if (links.Distinct().Count() != links.Count) throw new ArgumentException($"the route from {from} to {to} crosses a link twice", nameof(links));
        From = from;
        To = to;
        Links = links;
        Latency = TimeSpan.FromTicks(links.Sum(l => l.Latency.Ticks));
    }

    public SimHost From { get; }
    public SimHost To { get; }
    public IReadOnlyList<SimLink> Links { get; }
    /// <summary>One way.</summary>
    public TimeSpan Latency { get; }
    public TimeSpan RoundTrip => Latency * 2;
    /// <summary>The narrowest link's bandwidth: what a flow alone on the route gets.</summary>
    public double BottleneckBytesPerSecond => Links.Min(l => l.BytesPerSecond);
}

/// <summary>Bytes moving along a route; the network sets its rate.</summary>
public sealed class Flow
{
    internal Flow(long id, SimRoute route, double bytes, double cap, Action<Flow> done, long started)
    {
        Id = id;
        Route = route;
        Bytes = bytes;
        Remaining = bytes;
        Cap = cap;
        Done = done;
        StartedAt = started;
    }

    internal readonly Action<Flow> Done;
    internal int Index;
    internal bool Frozen;

    public long Id { get; }
    public SimRoute Route { get; }
    public double Bytes { get; }
    /// <summary>Bytes still to go, as of the network's last update.</summary>
    public double Remaining { get; internal set; }
    /// <summary>The most this flow can take whatever the links offer (e.g. its sender's CPU, a bandwidth cap), bytes/s; infinity for none.</summary>
    public double Cap { get; }
    /// <summary>Its max-min fair share now, bytes/s.</summary>
    public double Rate { get; internal set; }
    /// <summary>Nanoseconds of virtual time.</summary>
    public long StartedAt { get; }
    public long FinishedAt { get; internal set; } = -1;
}

/// <summary>
/// Bandwidth shared between concurrent flows by max-min fairness (progressive filling, Bertsekas
/// and Gallager): every flow's rate rises together until a link is full or a flow reaches its
/// own cap; those flows keep that rate, the rest rise on. So two equal flows on one link get half
/// each, a flow held back elsewhere (a slower link, its cap) leaves its unused share to the
/// others, and a flow that ends gives its share back at once. Rates are recomputed whenever the
/// set of flows changes (once per instant however many change in it), and the next completion
/// is an event on the scheduler.
/// Not modelled: TCP's slow start and congestion control, window-limited throughput on long
/// round trips, packet loss; a flow's bytes start at full rate and the route's latency is paid
/// by whoever waits for an answer (a migration's Sync), not by the flow.
/// </summary>
public sealed class FlowNetwork
{
    private readonly EventScheduler _scheduler;
    private readonly List<Flow> _flows = [];
    private readonly List<SimLink> _links = [];
    private readonly HashSet<SimLink> _known = [];
    private readonly List<Flow> _capped = [];
    private readonly List<Flow> _finished = [];
    private long _lastUpdate, _nextId, _generation;
    private bool _reallocationQueued;

    public FlowNetwork(EventScheduler scheduler)
    {
        _scheduler = scheduler;
        _lastUpdate = scheduler.Now;
    }

    /// <summary>Flows on the network now.</summary>
    public int ActiveFlows => _flows.Count;
    /// <summary>Rate allocations computed so far (a measure of the simulator's work).</summary>
    public long Allocations { get; private set; }

    /// <summary>
    /// Starts <paramref name="bytes"/> along <paramref name="route"/> now; <paramref name="done"/>
    /// runs when the last byte has left (on the scheduler's thread, at that instant).
    /// <paramref name="cap"/> bounds the flow's rate (bytes/s; infinity: the links alone decide).
    /// </summary>
    public Flow Start(SimRoute route, double bytes, Action<Flow> done, double cap = double.PositiveInfinity)
    {
        if (!(bytes >= 0) || double.IsInfinity(bytes)) throw new ArgumentOutOfRangeException(nameof(bytes), bytes, "must be a finite number of bytes");
        if (!(cap > 0)) throw new ArgumentOutOfRangeException(nameof(cap), cap, "must be positive (infinity for none)");
        Update();
        var f = new Flow(_nextId++, route, bytes, cap, done, _scheduler.Now) { Index = _flows.Count };
        _flows.Add(f);
        foreach (var l in route.Links)
        {
            l.Flows.Add(f);
            if (_known.Add(l)) _links.Add(l);
        }
        QueueReallocation();
        return f;
    }

    /// <summary>Brings every flow's remaining bytes and every link's carried bytes up to now, at the rates in force since the last update.</summary>
    private void Update()
    {
        long now = _scheduler.Now;
        if (now == _lastUpdate) return;
        double dt = (now - _lastUpdate) / 1e9;
        _lastUpdate = now;
        foreach (var f in _flows)
        {
            double moved = Math.Min(f.Remaining, f.Rate * dt);
            f.Remaining -= moved;
            foreach (var l in f.Route.Links) l.BytesCarried += moved;
        }
    }

    private void QueueReallocation()
    {
        if (_reallocationQueued) return;
        _reallocationQueued = true;
        _scheduler.At(_scheduler.Now, Reallocate);
    }

    /// <summary>Once per instant in which flows came or went: finish what is done, share the links anew, and set the next completion.</summary>
    private void Reallocate()
    {
        _reallocationQueued = false;
        Update();
        FinishDone();
        Allocate();
        ScheduleNextCompletion();
    }

    private void FinishDone()
    {
        _finished.Clear();
        foreach (var f in _flows)
            if (IsDone(f)) _finished.Add(f);
        if (_finished.Count == 0) return;
        _finished.Sort((a, b) => a.Id.CompareTo(b.Id)); // callbacks in the order the flows started: deterministic
        foreach (var f in _finished) Remove(f);
        long now = _scheduler.Now;
        foreach (var f in _finished)
        {
            f.FinishedAt = now;
            f.Rate = 0;
            f.Done(f); // may start new flows: they queue another reallocation for this instant
        }
    }

    /// <summary>Done when what is left would take under a nanosecond at its rate (or a millionth of a byte): rounding, not data.</summary>
    private static bool IsDone(Flow f) => f.Remaining <= 1e-6 || f.Remaining <= f.Rate * 1e-9;

    private void Remove(Flow f)
    {
        int last = _flows.Count - 1;
        var moved = _flows[last];
        _flows[f.Index] = moved;
        moved.Index = f.Index;
        _flows.RemoveAt(last);
        foreach (var l in f.Route.Links)
        {
            l.Flows.Remove(f);
            if (l.Flows.Count == 0)
            {
                _known.Remove(l);
                _links.Remove(l);
            }
        }
    }

    /// <summary>
    /// Max-min fair rates by progressive filling. All unfrozen flows share one level; the next
    /// event as the level rises is either a link filling up (level = its spare capacity ÷ its
    /// unfrozen flows) or a flow reaching its cap; the flows concerned freeze at that level.
    /// O(flows × route length + steps × links).
    /// </summary>
    private void Allocate()
    {
        Allocations++;
        if (_flows.Count == 0) return;
        _capped.Clear();
        foreach (var f in _flows)
        {
            f.Frozen = false;
            f.Rate = 0;
            if (!double.IsPositiveInfinity(f.Cap)) _capped.Add(f);
        }
        foreach (var l in _links)
        {
            l.FrozenRate = 0;
            l.Unfrozen = l.Flows.Count;
        }
        _capped.Sort((a, b) => a.Cap != b.Cap ? a.Cap.CompareTo(b.Cap) : a.Id.CompareTo(b.Id));
        int nextCap = 0, unfrozen = _flows.Count;
        while (unfrozen > 0)
        {
            SimLink? bottleneck = null;
            double linkLevel = double.PositiveInfinity;
            foreach (var l in _links)
            {
                if (l.Unfrozen == 0) continue;
                double level = Math.Max(0, l.BytesPerSecond - l.FrozenRate) / l.Unfrozen;
                if (level < linkLevel) (linkLevel, bottleneck) = (level, l);
            }
            while (nextCap < _capped.Count && _capped[nextCap].Frozen) nextCap++;
            double capLevel = nextCap < _capped.Count ? _capped[nextCap].Cap : double.PositiveInfinity;
            if (bottleneck is null) break; // every route has a link: cannot happen while flows are unfrozen
            if (capLevel < linkLevel)
            {
                Freeze(_capped[nextCap], capLevel);
                unfrozen--;
                continue;
            }
            foreach (var f in bottleneck.Flows)
            {
                if (f.Frozen) continue;
                Freeze(f, linkLevel);
                unfrozen--;
            }
        }
    }

    private static void Freeze(Flow f, double rate)
    {
        f.Frozen = true;
        f.Rate = rate;
        foreach (var l in f.Route.Links)
        {
            l.FrozenRate += rate;
            l.Unfrozen--;
        }
    }

    private void ScheduleNextCompletion()
    {
        double soonest = double.PositiveInfinity;
        foreach (var f in _flows)
            if (f.Rate > 0) soonest = Math.Min(soonest, f.Remaining / f.Rate);
        if (double.IsPositiveInfinity(soonest)) return;
        long generation = ++_generation;
        _scheduler.At(_scheduler.Now + EventScheduler.Nanoseconds(soonest), () =>
        {
            // A later reallocation superseded this completion (the rates changed since).
            if (generation == _generation) Reallocate();
        });
    }
}
