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
    internal readonly List<FlowGroup> Groups = [];
    // Scratch of the max-min allocation.
    internal double FrozenRate;
    internal long Unfrozen;

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
    public long ActiveFlows => Groups.Sum(g => (long)g.Count);
    /// <summary>The rate it carries now, the sum of its flows' rates.</summary>
    public double CurrentRate => Groups.Sum(g => g.Rate * g.Count);
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
        BottleneckBytesPerSecond = links.Min(l => l.BytesPerSecond);
    }

    public SimHost From { get; }
    public SimHost To { get; }
    public IReadOnlyList<SimLink> Links { get; }
    /// <summary>One way.</summary>
    public TimeSpan Latency { get; }
    public TimeSpan RoundTrip => Latency * 2;
    /// <summary>The narrowest link's bandwidth: what a flow alone on the route gets.</summary>
    public double BottleneckBytesPerSecond { get; }
}

/// <summary>Bytes moving along a route; the network sets its rate.</summary>
public sealed class Flow
{
    internal Flow(long id, SimRoute route, double bytes, double cap, Action<Flow> done, long started)
    {
        Id = id;
        Route = route;
        Bytes = bytes;
        Cap = cap;
        Done = done;
        StartedAt = started;
    }

    internal readonly Action<Flow> Done;
    internal FlowGroup? Group;
    /// <summary>The group's service (bytes per flow) at which this flow is done.</summary>
    internal double FinishService;

    public long Id { get; }
    public SimRoute Route { get; }
    public double Bytes { get; }
    /// <summary>Bytes still to go, as of the network's last update.</summary>
    public double Remaining => Group is { } g ? Math.Max(0, FinishService - g.Service) : 0;
    /// <summary>The most this flow can take whatever the links offer (e.g. its sender's CPU, a bandwidth cap), bytes/s; infinity for none.</summary>
    public double Cap { get; }
    /// <summary>Its max-min fair share now, bytes/s (0 once done).</summary>
    public double Rate => Group?.Rate ?? 0;
    /// <summary>Nanoseconds of virtual time.</summary>
    public long StartedAt { get; }
    public long FinishedAt { get; internal set; } = -1;
}

/// <summary>
/// Flows on the same route with the same cap: max-min fairness gives them the same rate, so the
/// network allocates and advances them together — one service counter (bytes served to each
/// since the group was made) and a queue of the flows by the service at which each is done. A
/// change costs O(log n) per flow, and the allocation O(groups), however many flows share a route.
/// </summary>
internal sealed class FlowGroup(SimRoute route, double cap, long seq)
{
    public readonly SimRoute Route = route;
    /// <summary>Order of creation: ties in the allocation are broken by it, so runs are deterministic.</summary>
    public readonly long Seq = seq;
    public readonly double Cap = cap;
    public readonly PriorityQueue<Flow, (double Finish, long Id)> Flows = new();
    public int Count => Flows.Count;
    public double Service;
    public double Rate;
    public bool Frozen;
}

/// <summary>
/// Bandwidth shared between concurrent flows by max-min fairness (progressive filling, Bertsekas
/// and Gallager): every flow's rate rises together until a link is full or a flow reaches its
/// own cap; those flows keep that rate, the rest rise on. So two equal flows on one link get half
/// each, a flow held back elsewhere (a slower link, its cap) leaves its unused share to the
/// others, and a flow that ends gives its share back at once. Rates are recomputed whenever the
/// set of flows changes (once per instant however many change in it), over groups of flows
/// (same route, same cap: the same share), and the next completion is an event on the scheduler.
/// Not modelled: TCP's slow start and congestion control, window-limited throughput on long
/// round trips, packet loss; a flow's bytes start at full rate and the route's latency is paid
/// by whoever waits for an answer (a migration's Sync), not by the flow.
/// </summary>
public sealed class FlowNetwork
{
    private readonly EventScheduler _scheduler;
    private readonly List<FlowGroup> _groups = [];
    private readonly Dictionary<(SimRoute, double), FlowGroup> _groupOf = [];
    private readonly List<SimLink> _links = [];
    private readonly List<FlowGroup> _capped = [];
    private readonly List<Flow> _finished = [];
    private long _lastUpdate, _nextId, _nextGroup, _active, _completionEvent = -1;
    private bool _reallocationQueued;

    public FlowNetwork(EventScheduler scheduler)
    {
        _scheduler = scheduler;
        _lastUpdate = scheduler.Now;
    }

    /// <summary>Flows on the network now.</summary>
    public long ActiveFlows => _active;
    /// <summary>Rate allocations computed so far (a measure of the simulator's work).</summary>
    public long Allocations { get; private set; }
    /// <summary>Told after each new allocation (the links' rates have just changed), e.g. to record link utilisation over time.</summary>
    public Action? Reallocated { get; set; }

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
        var f = new Flow(_nextId++, route, bytes, cap, done, _scheduler.Now);
        // A cap at or above the route's narrowest link can never bind: such flows share a group with the uncapped ones.
        double key = cap >= route.BottleneckBytesPerSecond ? double.PositiveInfinity : cap;
        if (!_groupOf.TryGetValue((route, key), out var g))
        {
            g = new FlowGroup(route, key, _nextGroup++);
            _groupOf[(route, key)] = g;
            _groups.Add(g);
            foreach (var l in route.Links)
            {
                if (l.Groups.Count == 0) _links.Add(l);
                l.Groups.Add(g);
            }
        }
        f.Group = g;
        f.FinishService = g.Service + bytes;
        g.Flows.Enqueue(f, (f.FinishService, f.Id));
        _active++;
        QueueReallocation();
        return f;
    }

    /// <summary>Brings the counters (bytes carried, flows' remaining bytes) up to the clock's now, e.g. when a run stops at its horizon.</summary>
    public void Settle() => Update();

    /// <summary>Brings every group's service and every link's carried bytes up to now, at the rates in force since the last update.</summary>
    private void Update()
    {
        long now = _scheduler.Now;
        if (now == _lastUpdate) return;
        double dt = (now - _lastUpdate) / 1e9;
        _lastUpdate = now;
        foreach (var g in _groups)
        {
            double served = g.Rate * dt;
            if (served <= 0) continue;
            g.Service += served;
            foreach (var l in g.Route.Links) l.BytesCarried += served * g.Count;
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
        Reallocated?.Invoke();
    }

    private void FinishDone()
    {
        _finished.Clear();
        for (int i = _groups.Count - 1; i >= 0; i--)
        {
            var g = _groups[i];
            while (g.Flows.TryPeek(out var f, out var key) && IsDone(key.Finish - g.Service, g.Rate, key.Finish))
            {
                g.Flows.Dequeue();
                // Served a hair past its end (the event's time is rounded up to a nanosecond): not carried.
                double over = g.Service - key.Finish;
                if (over > 0) foreach (var l in g.Route.Links) l.BytesCarried -= over;
                _finished.Add(f);
            }
            if (g.Count == 0) RemoveGroup(g, i);
        }
        if (_finished.Count == 0) return;
        _active -= _finished.Count;
        _finished.Sort((a, b) => a.Id.CompareTo(b.Id)); // callbacks in the order the flows started: deterministic
        long now = _scheduler.Now;
        foreach (var f in _finished)
        {
            f.FinishedAt = now;
            f.Group = null;
            f.Done(f); // may start new flows: they queue another reallocation for this instant
        }
    }

    /// <summary>
    /// Done when what is left would take under a nanosecond at its rate, or is a millionth of a
    /// byte, or a millionth of a millionth of the group's service (the double's own rounding on a
    /// route that has carried terabytes): rounding, not data.
    /// </summary>
    private static bool IsDone(double remaining, double rate, double finish) => remaining <= 1e-6 || remaining <= rate * 1e-9 || remaining <= finish * 1e-12;

    private void RemoveGroup(FlowGroup g, int index)
    {
        _groups.RemoveAt(index);
        _groupOf.Remove((g.Route, g.Cap));
        foreach (var l in g.Route.Links)
        {
            l.Groups.Remove(g);
            if (l.Groups.Count == 0) _links.Remove(l);
        }
    }

    /// <summary>
    /// Max-min fair rates by progressive filling, over groups (a group of k flows counts k times).
    /// All unfrozen flows share one level; the next event as the level rises is either a link
    /// filling up (level = its spare capacity ÷ its unfrozen flows) or a group reaching its cap;
    /// the flows concerned freeze at that level. O(groups × route length + steps × links).
    /// </summary>
    private void Allocate()
    {
        Allocations++;
        if (_groups.Count == 0) return;
        _capped.Clear();
        foreach (var l in _links)
        {
            l.FrozenRate = 0;
            l.Unfrozen = 0;
        }
        foreach (var g in _groups)
        {
            g.Frozen = false;
            g.Rate = 0;
            if (!double.IsPositiveInfinity(g.Cap)) _capped.Add(g);
            foreach (var l in g.Route.Links) l.Unfrozen += g.Count;
        }
        _capped.Sort((a, b) => a.Cap != b.Cap ? a.Cap.CompareTo(b.Cap) : a.Seq.CompareTo(b.Seq));
        int nextCap = 0, unfrozen = _groups.Count;
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
            foreach (var g in bottleneck.Groups)
            {
                if (g.Frozen) continue;
                Freeze(g, linkLevel);
                unfrozen--;
            }
        }
    }

    private static void Freeze(FlowGroup g, double rate)
    {
        g.Frozen = true;
        g.Rate = rate;
        foreach (var l in g.Route.Links)
        {
            l.FrozenRate += rate * g.Count;
            l.Unfrozen -= g.Count;
        }
    }

    private void ScheduleNextCompletion()
    {
        // The rates changed: the completion set for the old ones is void.
        if (_completionEvent >= 0) _scheduler.Cancel(_completionEvent);
        _completionEvent = -1;
        double soonest = double.PositiveInfinity;
        foreach (var g in _groups)
            if (g.Rate > 0 && g.Flows.TryPeek(out _, out var key)) soonest = Math.Min(soonest, Math.Max(0, key.Finish - g.Service) / g.Rate);
        if (double.IsPositiveInfinity(soonest)) return;
        _completionEvent = _scheduler.At(_scheduler.Now + EventScheduler.Nanoseconds(soonest), () =>
        {
            _completionEvent = -1;
            Reallocate();
        });
    }
}
