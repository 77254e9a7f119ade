using LiveMig.Memory;
using LiveMig.Simulation;
using LiveMig.Traces;
using YamlDotNet.RepresentationModel;

namespace LiveMig.Mtd;

/// <summary>
/// YAML to <see cref="MtdScenario"/> with the simulator's conventions (<see cref="YamlFields"/>):
/// every field checked where it is, an unknown one refused, one line naming file, line and field.
/// The victim's workload, content and migration options are read by the simulator's own reader.
/// </summary>
internal sealed class MtdScenarioReader(string file, string directory)
{
    private readonly ScenarioReader _sim = new(file, directory);

    public static MtdScenario Load(string path)
    {
        return Parse(ScenarioYaml.ReadFile(path), path, ScenarioYaml.DirectoryOf(path));
    }

    public static MtdScenario Parse(string yaml, string file, string? directory)
    {
        return new MtdScenarioReader(file, directory ?? Directory.GetCurrentDirectory()).Read(ScenarioYaml.Root(yaml, file));
    }

    private MtdScenario Read(YamlNode root)
    {
        var top = new YamlFields(file, "", root);
        ulong seed = (ulong)(top.Number("seed", 0, 9e15, "a whole number ≥ 0") ?? 1);
        int runs = top.Int("runs", 1, 1_000_000) ?? 200;
        var horizon = top.Duration("horizon") ?? TimeSpan.FromDays(7);
        if (horizon <= TimeSpan.Zero || horizon > TimeSpan.FromDays(3650)) throw top.Fail(top.Get("horizon")!, "horizon", "expected a positive duration of at most 10 years, e.g. 7d");
        var cloud = ReadCloud(top.Map("cloud"));
        var victim = ReadVictim(top.Map("victim") ?? throw YamlFields.Fail(file, root, "victim", "missing (required): the VM defended (memory, workload)"));
        var attacker = ReadAttacker(top.Map("attacker") ?? throw YamlFields.Fail(file, root, "attacker", "missing (required): at least its attack-time"));
        var detector = top.Map("detector") is { } d ? ReadDetector(d) : null;
        var policies = ReadPolicies(top, detector);
        if (policies.Count == 0) throw YamlFields.Fail(file, root, "policies", "missing (required): the defences to compare, e.g. [none, {kind: periodic, every: [1h, 2h]}]");
        if (policies.Count > 1000) throw top.Fail(top.Get("policies")!, "policies", $"{policies.Count} configurations: at most 1000");
        var pareto = top.Choice("pareto", ("migrations", CostMetric.Migrations), ("bytes", CostMetric.Bytes), ("downtime", CostMetric.Downtime), ("degradation", CostMetric.Degradation)) ?? CostMetric.Downtime;
        top.CheckNoOthers();
        return new MtdScenario
        {
            Seed = seed, Runs = runs, Horizon = horizon, Cloud = cloud, Victim = victim, Attacker = attacker, Detector = detector,
            Policies = policies, ParetoCost = pareto,
        };
    }

    private CloudSpec ReadCloud(YamlFields? f)
    {
        if (f is null) return new CloudSpec();
        var d = new CloudSpec();
        int hosts = f.Int("hosts", 2, 100_000) ?? d.Hosts;
        int racks = f.Int("racks", 1, 100_000) ?? d.Racks;
        if (racks > hosts) throw f.Fail(f.Get("racks")!, "racks", $"more racks than hosts ({hosts})");
        int slots = f.Int("slots", 1, 10_000) ?? d.Slots;
        double load = f.Fraction("load") ?? d.Load;
        var placement = f.Choice("placement", ("random", Placement.Random), ("least-loaded", Placement.LeastLoaded), ("pack", Placement.Pack)) ?? d.Placement;
        var link = ReadLink(f, "link") ?? d.Link;
        var cross = ReadLink(f, "cross-rack-link");
        if (cross is not null && racks == 1) throw f.Fail(f.Get("cross-rack-link")!, "cross-rack-link", "only with racks: 2 or more");
        f.CheckNoOthers();
        var cloud = new CloudSpec { Hosts = hosts, Racks = racks, Slots = slots, Load = load, Placement = placement, Link = link, CrossRackLink = cross };
        // The victim needs a slot where it starts and one to move to.
        if (BenignVms(cloud) + 2 > (long)hosts * slots) throw f.Fail(f.Get("load")!, "load", "leaves no slot for the victim to start in and move to: lower load or add slots");
        return cloud;
    }

    internal static long BenignVms(CloudSpec c) => (long)Math.Round(c.Load * c.Hosts * c.Slots);

    private LinkModel? ReadLink(YamlFields parent, string key)
    {
        if (parent.Map(key) is not { } f) return null;
        double bw = f.Rate("bandwidth") ?? throw f.Fail(f.Node, "bandwidth", "missing (required): e.g. 10Gbit");
        var latency = f.Duration("latency") ?? TimeSpan.Zero;
        f.CheckNoOthers();
        return new LinkModel(bw, latency);
    }

    private VictimSpec ReadVictim(YamlFields f)
    {
        long memory = f.Bytes("memory", GuestMemory.PageSize) ?? throw f.Fail(f.Node, "memory", "missing (required): e.g. 4GiB");
        long pages = (memory + GuestMemory.PageSize - 1) / GuestMemory.PageSize;
        int vcpus = f.Int("vcpus", 1, 1024) ?? 1;
        long state = f.Bytes("state") ?? 64 << 10;
        var migration = f.Map("migration") is { } m ? ReadMigration(m) : new SimMigrationOptions();
        string? trace = f.String("trace");
        var spec = new VictimSpec { Pages = pages, Vcpus = vcpus, StateBytes = state, Migration = migration };
        if (trace is not null)
        {
            if (f.Get("workload") is { } w) throw f.Fail(w, "workload", "give either workload or trace, not both");
            if (f.Get("content") is { } c) throw f.Fail(c, "content", "a trace brings its own content; leave content out");
            if (f.Get("cycle") is { } cy) throw f.Fail(cy, "cycle", "a trace repeats with its own length; cycle is for a workload's phases");
            string path = Path.IsPathRooted(trace) ? trace : Path.Combine(directory, trace);
            TraceFile t;
            try { t = TraceCache.Load(path); }
            catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException) { throw f.Fail(f.Get("trace")!, "trace", YamlFields.Printable(e.Message)); }
            if (t.End.PageSpace > pages) throw f.Fail(f.Get("memory")!, "memory", $"smaller than the trace's {Units.Bytes((long)t.End.PageSpace * GuestMemory.PageSize)} of pages");
            var step = f.Duration("cost-step") ?? TimeSpan.FromSeconds(10);
            if (step <= TimeSpan.Zero) throw f.Fail(f.Get("cost-step")!, "cost-step", "expected a positive duration, e.g. 10s");
            if (t.End.Duration.TotalSeconds / step.TotalSeconds > 1000) throw f.Fail(f.Get("cost-step")!, "cost-step", $"more than 1000 steps over the trace's {t.End.Duration.TotalSeconds:0.#} s: take a longer step");
            spec = spec with { Trace = path, CostStep = step };
        }
        else
        {
            if (f.Get("cost-step") is { } cs) throw f.Fail(cs, "cost-step", "only with a trace");
            var phases = _sim.ReadWorkload(f.Map("workload"), pages);
            var cycle = f.Duration("cycle");
            if (cycle is { } c && !(c.TotalSeconds > phases[^1].At)) throw f.Fail(f.Get("cycle")!, "cycle", $"must be longer than the last phase's start ({phases[^1].At:0.###} s)");
            spec = spec with { Phases = phases, Cycle = cycle, Content = _sim.ReadContent(f.Map("content")) };
        }
        f.CheckNoOthers();
        return spec;
    }

    private SimMigrationOptions ReadMigration(YamlFields m)
    {
        var options = _sim.ReadOptions(m, null);
        m.CheckNoOthers();
        return options;
    }

    private AttackerSpec ReadAttacker(YamlFields f)
    {
        var attack = f.Duration("attack-time") ?? throw f.Fail(f.Node, "attack-time", "missing (required): the co-residency an attack needs, e.g. 2h");
        if (attack <= TimeSpan.Zero) throw f.Fail(f.Get("attack-time")!, "attack-time", "expected a positive duration");
        var d = new AttackerSpec { AttackTime = attack };
        var every = f.Duration("launch-every") ?? d.LaunchEvery;
        if (every <= TimeSpan.Zero) throw f.Fail(f.Get("launch-every")!, "launch-every", "expected a positive duration, e.g. 10m");
        var spec = d with
        {
            Start = f.Duration("start") ?? d.Start,
            LaunchEvery = every,
            PoissonLaunches = f.Choice("launches", ("fixed", false), ("poisson", true)) ?? false,
            LaunchTime = f.Duration("launch-time") ?? d.LaunchTime,
            MaxVms = f.Int("max-vms", 1, 100_000) ?? d.MaxVms,
            MaxLaunches = f.Int("max-launches", 1, int.MaxValue) ?? long.MaxValue,
        };
        f.CheckNoOthers();
        return spec;
    }

    private static DetectorSpec ReadDetector(YamlFields f)
    {
        var every = f.Duration("check-every") ?? throw f.Fail(f.Node, "check-every", "missing (required): how often it looks, e.g. 5m");
        if (every <= TimeSpan.Zero) throw f.Fail(f.Get("check-every")!, "check-every", "expected a positive duration");
        double tp = f.Fraction("true-positive") ?? throw f.Fail(f.Node, "true-positive", "missing (required): e.g. 90%");
        double fp = f.Fraction("false-positive") ?? throw f.Fail(f.Node, "false-positive", "missing (required): e.g. 1%");
        var memory = f.Duration("memory") ?? TimeSpan.FromDays(1);
        f.CheckNoOthers();
        return new DetectorSpec(every, tp, fp) { Memory = memory };
    }

    private List<PolicySpec> ReadPolicies(YamlFields top, DetectorSpec? detector)
    {
        var list = new List<PolicySpec>();
        foreach (var (node, i) in top.List("policies").Select((n, i) => (n, i)))
        {
            string path = $"policies[{i}]";
            if (node is YamlScalarNode s)
            {
                if ((s.Value ?? "").Trim().ToLowerInvariant() != "none") throw YamlFields.Fail(file, node, path, $"expected none or a mapping such as {{kind: periodic, every: 1h}}, got '{YamlFields.Printable(s.Value ?? "")}'");
                list.Add(new PolicySpec { Kind = PolicyKind.None });
                continue;
            }
            list.AddRange(ReadPolicy(new YamlFields(file, path, node), detector));
        }
        return list;
    }

    /// <summary>One policy entry, expanded over its lists of intervals and destinations.</summary>
    private IEnumerable<PolicySpec> ReadPolicy(YamlFields f, DetectorSpec? detector)
    {
        var kind = f.Choice("kind", ("none", PolicyKind.None), ("periodic", PolicyKind.Periodic), ("poisson", PolicyKind.Poisson), ("threat", PolicyKind.Threat), ("cost-aware", PolicyKind.CostAware))
            ?? throw f.Fail(f.Node, "kind", "missing (required): none, periodic, poisson, threat or cost-aware");
        // A misspelt field is named before a field it may have been meant to be is missed.
        f.CheckNoOthers(kind switch
        {
            PolicyKind.Periodic => ["every", "destination"],
            PolicyKind.Poisson => ["mean", "destination"],
            PolicyKind.Threat => ["destination"],
            PolicyKind.CostAware => ["min", "max", "check-every", "cheap-within", "by", "destination"],
            _ => ["destination"],
        });
        var destinations = Destinations(f);
        List<PolicySpec> specs;
        switch (kind)
        {
            case PolicyKind.None:
                specs = [new PolicySpec { Kind = kind }];
                if (f.Has("destination")) throw f.Fail(f.Get("destination")!, "destination", "none moves nothing");
                break;
            case PolicyKind.Periodic:
                specs = [.. Durations(f, "every", required: true).Select(t => new PolicySpec { Kind = kind, Interval = t })];
                break;
            case PolicyKind.Poisson:
                specs = [.. Durations(f, "mean", required: true).Select(t => new PolicySpec { Kind = kind, Interval = t })];
                break;
            case PolicyKind.Threat:
                if (detector is null) throw f.Fail(f.Get("kind")!, "kind", "threat moves on the detector's alarms: give a detector");
                specs = [new PolicySpec { Kind = kind }];
                break;
            default:
                specs = [.. CostAware(f)];
                break;
        }
        f.CheckNoOthers();
        return specs.SelectMany(p => destinations.Select(d => p with { Destination = d }));
    }

    private List<PolicySpec> CostAware(YamlFields f)
    {
        var mins = Durations(f, "min", required: false);
        if (mins.Count > 1) throw f.Fail(f.Get("min")!, "min", "one value (the list is max)");
        var min = mins.Count == 1 ? mins[0] : TimeSpan.Zero;
        var check = f.Duration("check-every") ?? TimeSpan.FromMinutes(5);
        if (check <= TimeSpan.Zero) throw f.Fail(f.Get("check-every")!, "check-every", "expected a positive duration");
        double within = f.Fraction("cheap-within") ?? 0.2;
        var by = f.Choice("by", ("bytes", CostMetric.Bytes), ("downtime", CostMetric.Downtime), ("degradation", CostMetric.Degradation)) ?? CostMetric.Bytes;
        var maxes = Durations(f, "max", required: true);
        foreach (var max in maxes)
            if (max <= min) throw f.Fail(f.Get("max")!, "max", $"{MtdUnits.Duration(max)} is not longer than min ({MtdUnits.Duration(min)})");
        return [.. maxes.Select(m => new PolicySpec { Kind = PolicyKind.CostAware, MinInterval = min, Interval = m, CheckEvery = check, CheapWithin = within, CheapBy = by })];
    }

    private static List<DestinationChoice> Destinations(YamlFields f)
    {
        if (!f.Has("destination")) return [DestinationChoice.Random];
        var names = f.Strings("destination");
        var list = new List<DestinationChoice>();
        foreach (string n in names)
        {
            list.Add(n.Trim().ToLowerInvariant() switch
            {
                "random" => DestinationChoice.Random,
                "least-loaded" => DestinationChoice.LeastLoaded,
                "attacker-aware" => DestinationChoice.AttackerAware,
                _ => throw f.Fail(f.Get("destination")!, "destination", $"expected random, least-loaded, attacker-aware; got '{YamlFields.Printable(n)}'"),
            });
        }
        if (list.Distinct().Count() != list.Count) throw f.Fail(f.Get("destination")!, "destination", "a destination choice given twice");
        return list;
    }

    /// <summary>A positive duration or a list of them (the sweep).</summary>
    private static List<TimeSpan> Durations(YamlFields f, string key, bool required)
    {
        if (!f.Has(key))
        {
            if (required) throw f.Fail(f.Node, key, "missing (required): a duration or a list of them, e.g. [30m, 1h, 2h]");
            f.Get(key);
            return [];
        }
        var node = f.Get(key)!;
        var list = new List<TimeSpan>();
        foreach (string t in f.Strings(key))
        {
            if (!YamlFields.TryParseDuration(t, out var d) || d <= TimeSpan.Zero) throw f.Fail(node, key, $"expected a positive duration such as 30m or 2h, got '{YamlFields.Printable(t)}'");
            list.Add(d);
        }
        if (list.Count == 0) throw f.Fail(node, key, "an empty list");
        return list;
    }
}
