using System.Text.Json;
using System.Text.Json.Serialization;
using LiveMig.Traces;
using LiveMig.Workloads;

namespace LiveMig.Simulation;

/// <summary>A link's share of the work over the whole simulation.</summary>
public sealed record LinkUsage(string Name, double BytesPerSecond, double BytesCarried, double Utilisation)
{
    /// <summary>With <see cref="ScenarioRunner.RecordTimeline"/>: the link's rate (bytes/s) from each time on (seconds), until the next point.</summary>
    [JsonIgnore(Condition = JsonIgnoreCondition.WhenWritingNull)]
    public IReadOnlyList<RatePoint>? Rates { get; init; }
}

/// <summary>A link's carried rate from <see cref="AtS"/> on.</summary>
public sealed record RatePoint(double AtS, double BytesPerSecond);

/// <summary>What a simulated scenario came to: every migration (in the order they were asked for), every link's load.</summary>
public sealed record SimulationResult
{
    public ulong Seed { get; init; }
    /// <summary>Virtual seconds from the start to the last event.</summary>
    public double EndS { get; init; }
    public long Events { get; init; }
    public required IReadOnlyList<SimMigrationResult> Migrations { get; init; }
    public required IReadOnlyList<LinkUsage> Links { get; init; }

    public string ToJson(bool indented = false) => JsonSerializer.Serialize(this, indented ? SimJson.Indented.SimulationResult : SimJson.Default.SimulationResult);
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(SimulationResult))]
internal partial class SimJson : JsonSerializerContext
{
    public static SimJson Indented { get; } = new(new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase });
}

/// <summary>
/// Runs a <see cref="Scenario"/>: builds its hosts, links, routes and VMs on one event scheduler
/// and network, starts its migrations at their times and its evacuations in their order, and runs
/// the events until none is left (or the scenario's horizon). Single-threaded and seeded: the same
/// scenario and seed give the same result, to the byte of its JSON.
/// </summary>
public sealed class ScenarioRunner
{
    private readonly Scenario _scenario;
    private readonly EventScheduler _scheduler = new();
    private readonly FlowNetwork _network;
    private readonly Dictionary<string, SimHost> _hosts = [];
    private readonly Dictionary<(SimHost, SimHost), SimRoute> _routes = [];
    private readonly Dictionary<string, SimVm> _vms = [];
    private readonly List<SimVm> _vmOrder = [];
    private readonly List<SimLink> _links = [];
    // Every migration asked for, in order; its result once known (skipped ones at once).
    private readonly List<(SimMigration? Migration, SimMigrationResult? Result)> _asked = [];

    public ScenarioRunner(Scenario scenario, ulong? seed = null)
    {
        _scenario = scenario;
        Seed = seed ?? scenario.Seed;
        _network = new FlowNetwork(_scheduler);
        Build();
    }

    public ulong Seed { get; }
    /// <summary>Keep each migration's timeline and each link's rate over time (for plots); off by default: it costs memory per round and per rate change.</summary>
    public bool RecordTimeline { get; init; }
    public EventScheduler Scheduler => _scheduler;
    public FlowNetwork Network => _network;

    public static SimulationResult Run(Scenario scenario, ulong? seed = null) => new ScenarioRunner(scenario, seed).Run();

    private void Build()
    {
        foreach (string h in _scenario.Hosts) _hosts[h] = new SimHost(h);
        var links = new Dictionary<string, SimLink>();
        foreach (var l in _scenario.Links)
        {
            var link = new SimLink(l.Name, l.BytesPerSecond, l.Latency);
            links[l.Name] = link;
            _links.Add(link);
            if (l.Between is var (a, b))
            {
                _routes[(_hosts[a], _hosts[b])] = new SimRoute(_hosts[a], _hosts[b], [link]);
                _routes[(_hosts[b], _hosts[a])] = new SimRoute(_hosts[b], _hosts[a], [link]);
            }
        }
        // Explicit routes win over a link's between.
        foreach (var r in _scenario.Routes)
            _routes[(_hosts[r.From], _hosts[r.To])] = new SimRoute(_hosts[r.From], _hosts[r.To], r.Via.Select(v => links[v]).ToList());
        var seeds = VmSeeds(_scenario, Seed);
        foreach (var spec in _scenario.Vms)
            foreach (string name in spec.Names())
            {
                var vm = MakeVm(spec, name, seeds[name]);
                _vms[name] = vm;
                _vmOrder.Add(vm);
            }
    }

    /// <summary>Each VM's seed: its own if it has one, else drawn in the file's order from the scenario's (so adding a seed to one VM does not change the others').</summary>
    public static IReadOnlyDictionary<string, ulong> VmSeeds(Scenario scenario, ulong seed)
    {
        var seeds = new Dictionary<string, ulong>();
        ulong mix = seed;
        foreach (var spec in scenario.Vms)
            foreach (string name in spec.Names())
            {
                ulong drawn = Xoshiro256.SplitMix(ref mix);
                seeds[name] = spec.Seed ?? drawn;
            }
        return seeds;
    }

    private SimVm MakeVm(VmSpec spec, string name, ulong seed)
    {
        var host = _hosts[spec.Host];
        if (spec.Trace is { } path)
        {
            var trace = TraceCache.Load(path);
            var process = new TraceDirtyProcess(trace, spec.Loop, spec.TraceOffset.TotalSeconds);
            return new SimVm(name, host, spec.Pages, spec.Vcpus, process, process, spec.StateBytes, _scheduler.Clock);
        }
        if (spec.BuiltIn is { } builtIn)
        {
            var w = WorkloadSpec.Parse(builtIn);
            return new SimVm(name, host, spec.Pages, spec.Vcpus, BuiltInModels.Dirty(w, spec.Pages, spec.Vcpus, seed), BuiltInModels.Content(spec.Fill, w.Name), spec.StateBytes, _scheduler.Clock);
        }
        var dirty = new DirtyModel(spec.Pages, spec.Phases!, seed);
        return new SimVm(name, host, spec.Pages, spec.Vcpus, dirty, spec.Content!, spec.StateBytes, _scheduler.Clock)
            .WithReads(spec.Reads, seed ^ 0x5EAD5EAD5EAD5EADUL); // the reads' own stream: adding them leaves the writes' draws as they were
    }

    private readonly Dictionary<SimLink, List<RatePoint>> _rates = [];

    /// <summary>After each reallocation: every link whose rate changed gets a point.</summary>
    private void RecordRates()
    {
        double now = _scheduler.NowSeconds;
        foreach (var l in _links)
        {
            var points = _rates[l];
            double rate = l.CurrentRate;
            if (points.Count > 0 && points[^1].BytesPerSecond == rate) continue;
            if (points.Count > 0 && points[^1].AtS == now) points[^1] = new RatePoint(now, rate);
            else points.Add(new RatePoint(now, rate));
        }
    }

    public SimulationResult Run()
    {
        if (RecordTimeline)
        {
            foreach (var l in _links) _rates[l] = [new RatePoint(0, 0)];
            _network.Reallocated = RecordRates;
        }
        foreach (var m in _scenario.Migrations)
            _scheduler.After(m.At, () => StartMigration(_vms[m.Vm], m.To, m.Options, null));
        foreach (var e in _scenario.Evacuations)
            _scheduler.After(e.At, () => Evacuate(e));
        long horizon = EventScheduler.Nanoseconds(_scenario.Horizon);
        _scheduler.Run(until: horizon, maxEvents: long.MaxValue);
        if (_scheduler.Pending > 0)
        {
            // Stopped by the horizon with work left: the simulated time is the horizon, the links' counters up to it.
            _scheduler.Clock.AdvanceTo(horizon);
            _network.Settle();
        }
        var results = _asked.Select(a => a.Result ?? a.Migration!.Result ?? Unfinished(a.Migration!)).ToList();
        double end = _scheduler.NowSeconds;
        return new SimulationResult
        {
            Seed = Seed,
            EndS = end,
            Events = _scheduler.EventsRun,
            Migrations = results,
            Links = _links.Select(l => new LinkUsage(l.Name, l.BytesPerSecond, Math.Round(l.BytesCarried), end > 0 ? l.BytesCarried / (l.BytesPerSecond * end) : 0)
            {
                Rates = RecordTimeline ? _rates[l] : null,
            }).ToList(),
        };
    }

    private static SimMigrationResult Unfinished(SimMigration m) => new()
    {
        Vm = m.Vm.Name, From = m.Route.From.Name, To = m.Route.To.Name, Outcome = "unfinished",
        Error = "still running when the scenario's horizon was reached", MemoryBytes = m.Vm.MemoryBytes,
    };

    /// <summary>Starts a migration now, or records why it cannot start; <paramref name="ended"/> hears when it is over either way.</summary>
    private void StartMigration(SimVm vm, string to, SimMigrationOptions options, Action? ended)
    {
        var dest = _hosts[to];
        string? why = vm.Migrating ? "already migrating" : vm.Host == dest ? $"already on {to}" : _routes.ContainsKey((vm.Host, dest)) ? null : $"no route from {vm.Host} to {to}";
        if (why is not null)
        {
            _asked.Add((null, new SimMigrationResult
            {
                Vm = vm.Name, From = vm.Host.Name, To = to, Outcome = "skipped", Error = why,
                StartS = _scheduler.NowSeconds, MemoryBytes = vm.MemoryBytes,
            }));
            ended?.Invoke();
            return;
        }
        var m = new SimMigration(_scheduler, _network, vm, _routes[(vm.Host, dest)], options) { RecordPhases = RecordTimeline };
        if (ended is not null) m.Ended += _ => ended();
        _asked.Add((m, null));
        m.Start();
    }

    /// <summary>Every VM on the host now (in the order the scenario gives them) to the destinations in turn, at most so many at once.</summary>
    private void Evacuate(EvacuationSpec e)
    {
        var host = _hosts[e.Host];
        var queue = new Queue<SimVm>(_vmOrder.Where(v => v.Host == host && !v.Migrating));
        int running = 0, next = 0;
        void StartMore()
        {
            while (running < e.MaxParallel && queue.Count > 0)
            {
                var vm = queue.Dequeue();
                string to = e.To[next++ % e.To.Count];
                running++;
                // A migration that ends frees its slot for the next VM in line.
                StartMigration(vm, to, e.Options, () => { running--; _scheduler.AfterSeconds(0, StartMore); });
            }
        }
        StartMore();
    }
}
