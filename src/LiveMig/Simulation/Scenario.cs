using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Policies;
using LiveMig.Traces;
using LiveMig.Vm;
using LiveMig.Workloads;
using YamlDotNet.RepresentationModel;

namespace LiveMig.Simulation;

public sealed record LinkSpec(string Name, double BytesPerSecond, TimeSpan Latency, (string A, string B)? Between);

public sealed record RouteSpec(string From, string To, IReadOnlyList<string> Via);

/// <summary>A VM (or <see cref="Count"/> alike, named NAME-1…NAME-N): memory, vCPUs, state, and either a hand dirty model or a recorded trace, and a content model.</summary>
public sealed record VmSpec
{
    public required string Name { get; init; }
    public required string Host { get; init; }
    public required long Pages { get; init; }
    public int Vcpus { get; init; } = 1;
    public long StateBytes { get; init; }
    public int Count { get; init; } = 1;
    /// <summary>Phases of the hand model (null: a trace drives the VM).</summary>
    public IReadOnlyList<DirtyPhase>? Phases { get; init; }
    /// <summary>The hand model's reads (null: none modelled): they cost nothing but in post-copy, where a read of a page not yet there is a fault.</summary>
    public ReadModel? Reads { get; init; }
    public IContentModel? Content { get; init; }
    /// <summary>A recorded trace (absolute path), with where the replay starts and whether it loops.</summary>
    public string? Trace { get; init; }
    public bool Loop { get; init; } = true;
    public TimeSpan TraceOffset { get; init; }
    /// <summary>A built-in VM's workload (<c>random:rate=20000,range=32MiB</c>; <see cref="BuiltInModels"/>) and memory fill: what <c>validate</c> runs for real. Null: a hand model or a trace.</summary>
    public string? BuiltIn { get; init; }
    public MemoryFill Fill { get; init; } = MemoryFill.Mixed;
    /// <summary>The VM's own seed (its dirty draws; a built-in VM's fill and workload); null: drawn from the scenario's seed.</summary>
    public ulong? Seed { get; init; }

    public IEnumerable<string> Names() => Count == 1 ? [Name] : Enumerable.Range(1, Count).Select(i => $"{Name}-{i}");
}

public sealed record MigrationSpec(string Vm, string To, TimeSpan At, SimMigrationOptions Options);

/// <summary>Moves every VM off a host: to its destinations in turn, one after another (sequential) or at most <see cref="MaxParallel"/> at once (parallel).</summary>
public sealed record EvacuationSpec(string Host, IReadOnlyList<string> To, bool Parallel, int MaxParallel, TimeSpan At, SimMigrationOptions Options);

/// <summary>
/// A simulation scenario (docs/simulator.md, "Scenario files"): hosts, links and routes, VMs
/// with their workloads, and what to migrate when. Read from YAML by <see cref="Load"/>, which
/// checks everything before anything runs: a bad file is one line naming the field and line.
/// </summary>
public sealed record Scenario
{
    public ulong Seed { get; init; } = 1;
    public required IReadOnlyList<string> Hosts { get; init; }
    public required IReadOnlyList<LinkSpec> Links { get; init; }
    public IReadOnlyList<RouteSpec> Routes { get; init; } = [];
    public required IReadOnlyList<VmSpec> Vms { get; init; }
    public IReadOnlyList<MigrationSpec> Migrations { get; init; } = [];
    public IReadOnlyList<EvacuationSpec> Evacuations { get; init; } = [];

    /// <summary>The longest a scenario may run in virtual time: a bound, so a model that never ends cannot keep the simulator busy.</summary>
    public TimeSpan Horizon { get; init; } = TimeSpan.FromDays(1);

    public static Scenario Load(string path)
    {
        return Parse(ScenarioYaml.ReadFile(path), path, ScenarioYaml.DirectoryOf(path));
    }

    /// <summary>Reads a scenario from YAML text; <paramref name="file"/> names it in errors, relative trace paths are taken from <paramref name="directory"/>.</summary>
    public static Scenario Parse(string yaml, string file = "scenario", string? directory = null)
    {
        return new ScenarioReader(file, directory ?? Directory.GetCurrentDirectory()).Read(ScenarioYaml.Root(yaml, file));
    }
}

/// <summary>YAML to <see cref="Scenario"/>, checking each field where it is.</summary>
internal sealed class ScenarioReader(string file, string directory)
{
    private readonly HashSet<string> _hosts = [];
    private readonly Dictionary<string, VmSpec> _vmByName = [];

    public Scenario Read(YamlNode root)
    {
        var top = new YamlFields(file, "", root);
        ulong seed = (ulong)(top.Number("seed", 0, 9e15, "a whole number ≥ 0") ?? 1);
        var hosts = top.Strings("hosts");
        if (!top.Has("hosts")) throw YamlFields.Fail(file, root, "hosts", "missing (required): the hosts, e.g. hosts: [a, b]");
        foreach (string h in hosts)
            if (!_hosts.Add(h)) throw YamlFields.Fail(file, top.Get("hosts")!, "hosts", $"host '{YamlFields.Printable(h)}' given twice");
        var links = top.List("links").Select((n, i) => ReadLink(new YamlFields(file, $"links[{i}]", n))).ToList();
        if (links.Count == 0) throw YamlFields.Fail(file, root, "links", "missing (required): at least one link");
        var linkNames = new HashSet<string>();
        foreach (var (l, n) in links.Zip(top.List("links")))
            if (!linkNames.Add(l.Name)) throw YamlFields.Fail(file, n, "links", $"link '{YamlFields.Printable(l.Name)}' given twice");
        var routes = top.List("routes").Select((n, i) => ReadRoute(new YamlFields(file, $"routes[{i}]", n), linkNames)).ToList();
        var vms = top.List("vms").Select((n, i) => ReadVm(new YamlFields(file, $"vms[{i}]", n))).ToList();
        if (vms.Count == 0) throw YamlFields.Fail(file, root, "vms", "missing (required): at least one VM");
        var defaults = top.Map("defaults");
        if (defaults is not null) ReadOptions(defaults, null);
        defaults?.CheckNoOthers();
        var migrations = top.List("migrations").Select((n, i) => ReadMigration(new YamlFields(file, $"migrations[{i}]", n), defaults)).ToList();
        var evacuations = ReadEvacuations(top, defaults);
        if (migrations.Count == 0 && evacuations.Count == 0) throw YamlFields.Fail(file, root, "migrations", "nothing to simulate: give migrations or evacuate");
        var horizon = top.Duration("horizon") ?? TimeSpan.FromDays(1);
        if (horizon <= TimeSpan.Zero || horizon > TimeSpan.FromDays(36500)) throw top.Fail(top.Get("horizon")!, "horizon", "expected a positive duration of at most 100 years, e.g. 604800s (a week)");
        var scenario = new Scenario { Seed = seed, Hosts = hosts, Links = links, Routes = routes, Vms = vms, Migrations = migrations, Evacuations = evacuations, Horizon = horizon };
        top.CheckNoOthers();
        CheckRoutes(scenario, top);
        return scenario;
    }

    private LinkSpec ReadLink(YamlFields f)
    {
        string name = f.RequiredString("name");
        double bw = f.Rate("bandwidth") ?? throw f.Fail(f.Node, "bandwidth", "missing (required): e.g. 1Gbit");
        var latency = f.Duration("latency") ?? TimeSpan.Zero;
        (string, string)? between = null;
        if (f.Get("between") is { } b)
        {
            var ends = f.Strings("between");
            if (ends.Count != 2 || ends[0] == ends[1]) throw f.Fail(b, "between", "expected two different hosts, e.g. [a, b]");
            foreach (string h in ends) Host(f, b, "between", h);
            between = (ends[0], ends[1]);
        }
        f.CheckNoOthers();
        return new LinkSpec(name, bw, latency, between);
    }

    private string Host(YamlFields f, YamlNode node, string key, string name) =>
        _hosts.Contains(name) ? name : throw f.Fail(node, key, $"no host '{YamlFields.Printable(name)}' (hosts: {string.Join(", ", _hosts)})");

    private RouteSpec ReadRoute(YamlFields f, HashSet<string> links)
    {
        string from = Host(f, f.Required("from"), "from", f.RequiredString("from"));
        string to = Host(f, f.Required("to"), "to", f.RequiredString("to"));
        if (from == to) throw f.Fail(f.Node, "to", "a route joins two different hosts");
        var via = f.Strings("via");
        if (via.Count == 0) throw f.Fail(f.Node, "via", "missing (required): the links crossed, in order");
        foreach (string l in via)
            if (!links.Contains(l)) throw f.Fail(f.Get("via")!, "via", $"no link '{YamlFields.Printable(l)}'");
        if (via.Distinct().Count() != via.Count) throw f.Fail(f.Get("via")!, "via", "a link is crossed twice");
        f.CheckNoOthers();
        return new RouteSpec(from, to, via);
    }

    private VmSpec ReadVm(YamlFields f)
    {
        string name = f.RequiredString("name");
        if (name.Length == 0 || name.Any(c => !(char.IsAsciiLetterOrDigit(c) || c is '.' or '_' or '-'))) throw f.Fail(f.Get("name")!, "name", "letters, digits, '.', '_', '-' only");
        string host = Host(f, f.Required("host"), "host", f.RequiredString("host"));
        long memory = f.Bytes("memory", GuestMemory.PageSize) ?? throw f.Fail(f.Node, "memory", "missing (required): e.g. 4GiB");
        long pages = (memory + GuestMemory.PageSize - 1) / GuestMemory.PageSize;
        int vcpus = f.Int("vcpus", 1, 1024) ?? 1;
        long state = f.Bytes("state") ?? 64 << 10;
        int count = f.Int("count", 1, 1_000_000) ?? 1;
        string? trace = f.String("trace");
        var workload = f.Get("workload") is YamlScalarNode ? null : f.Map("workload");
        if (trace is not null && f.Has("workload")) throw f.Fail(f.Get("workload")!, "workload", "give either workload or trace, not both");
        var spec = new VmSpec { Name = name, Host = host, Pages = pages, Vcpus = vcpus, StateBytes = state, Count = count };
        if (trace is not null)
        {
            string path = Path.IsPathRooted(trace) ? trace : Path.Combine(directory, trace);
            TraceFile t;
            try { t = TraceCache.Load(path); }
            catch (Exception e) when (e is IOException or InvalidDataException or UnauthorizedAccessException) { throw f.Fail(f.Get("trace")!, "trace", YamlFields.Printable(e.Message)); }
            if (t.End.PageSpace > pages) throw f.Fail(f.Get("memory")!, "memory", $"smaller than the trace's {Units.Bytes((long)t.End.PageSpace * GuestMemory.PageSize)} of pages");
            spec = spec with { Trace = path, Loop = f.Bool("loop") ?? true, TraceOffset = f.Duration("offset") ?? TimeSpan.Zero };
            if (f.Get("content") is { } c) throw f.Fail(c, "content", "a trace brings its own content; leave content out");
        }
        else if (f.Get("workload") is YamlScalarNode builtIn)
        {
            spec = ReadBuiltIn(f, builtIn, spec);
        }
        else
        {
            var reads = ReadReads(workload, pages); // before ReadWorkload checks the workload's fields
            spec = spec with { Reads = reads, Phases = ReadWorkload(workload, pages), Content = ReadContent(f.Map("content")) };
        }
        if (spec.BuiltIn is null && f.Get("fill") is { } fillNode) throw f.Fail(fillNode, "fill", "only with a built-in workload (workload: \"random:rate=20000\")");
        f.CheckNoOthers();
        foreach (string n in spec.Names())
            if (!_vmByName.TryAdd(n, spec)) throw f.Fail(f.Get("name")!, "name", $"VM '{n}' given twice");
        return spec;
    }

    /// <summary>A built-in VM's workload, as <c>--workload</c> takes it, and its fill: modelled by <see cref="BuiltInModels"/> (checked here, so a workload it cannot model is refused where it is).</summary>
    private VmSpec ReadBuiltIn(YamlFields f, YamlScalarNode node, VmSpec spec)
    {
        string text = f.Text(node, "workload");
        var fill = f.Choice("fill", ("mixed", MemoryFill.Mixed), ("zero", MemoryFill.Zero), ("random", MemoryFill.Random)) ?? MemoryFill.Mixed;
        if (f.Get("content") is { } c) throw f.Fail(c, "content", "a built-in workload's content is its fill (fill: mixed, zero or random); leave content out");
        try
        {
            var w = WorkloadSpec.Parse(text);
            BuiltInModels.Dirty(w, spec.Pages, spec.Vcpus, 1);
            return spec with { BuiltIn = w.ToString(), Fill = fill };
        }
        catch (FormatException e) { throw f.Fail(node, "workload", YamlFields.Printable(e.Message, 240)); }
    }

    internal List<DirtyPhase> ReadWorkload(YamlFields? w, long pages)
    {
        if (w is null) return [new DirtyPhase(0, 0, pages)]; // idle
        var first = ReadPhase(w, pages, new DirtyPhase(0, 0, pages), isFirst: true);
        var phases = new List<DirtyPhase> { first };
        foreach (var (n, i) in w.List("phases").Select((n, i) => (n, i)))
        {
            var pf = new YamlFields(file, $"{w.Path}.phases[{i}]", n);
            var p = ReadPhase(pf, pages, phases[^1], isFirst: false);
            if (!(p.At > phases[^1].At)) throw pf.Fail(pf.Get("at")!, "at", "each phase starts after the one before (and after 0)");
            pf.CheckNoOthers();
            phases.Add(p);
        }
        w.CheckNoOthers();
        return phases;
    }

    /// <summary>The workload's <c>reads: {rate, working-set}</c>, or null.</summary>
    private ReadModel? ReadReads(YamlFields? w, long pages)
    {
        if (w?.Map("reads") is not { } r) return null;
        double rate = r.Number("rate", 0, 1e12, "page reads per second, e.g. 50000 or 50k") ?? throw r.Fail(r.Node, "rate", "missing (required): page reads per second, e.g. 50k");
        long set = pages;
        if (r.Get("working-set") is { } ws)
        {
            set = (r.Bytes("working-set", GuestMemory.PageSize)!.Value + GuestMemory.PageSize - 1) / GuestMemory.PageSize;
            if (set > pages) throw r.Fail(ws, "working-set", "larger than the VM's memory");
        }
        r.CheckNoOthers();
        return new ReadModel(rate, set);
    }

    /// <summary>A phase: what it gives, the rest carried over from the phase before.</summary>
    private DirtyPhase ReadPhase(YamlFields f, long pages, DirtyPhase before, bool isFirst)
    {
        double at = 0;
        if (!isFirst) at = (f.Duration("at") ?? throw f.Fail(f.Node, "at", "missing (required): when the phase starts, e.g. 30s")).TotalSeconds;
        double rate = f.Number("rate", 0, 1e12, "page writes per second, e.g. 20000 or 20k") ?? before.Rate;
        long wws = before.WorkingSet;
        if (f.Get("working-set") is { } ws)
        {
            long bytes = f.Bytes("working-set", GuestMemory.PageSize)!.Value;
            wws = (bytes + GuestMemory.PageSize - 1) / GuestMemory.PageSize;
            if (wws > pages) throw f.Fail(ws, "working-set", "larger than the VM's memory");
        }
        double hot = f.Fraction("hot-set") ?? before.HotShare;
        double hotWrites = f.Fraction("hot-writes") ?? before.HotWrites;
        if (hot > 0 && hotWrites == 0 && !f.Has("hot-writes")) throw f.Fail(f.Get("hot-set")!, "hot-set", "give hot-writes too: the share of the writes that fall on the hot set");
        return new DirtyPhase(at, rate, wws, hot, hotWrites);
    }

    internal ContentMixModel ReadContent(YamlFields? c)
    {
        if (c is null) return new ContentMixModel(new ContentShares());
        var image = ReadShares(c);
        double changed = c.Number("bytes-changed", 1, GuestMemory.PageSize, $"bytes from 1 to {GuestMemory.PageSize}") ?? GuestMemory.PageSize;
        ContentShares? written = null;
        if (c.Map("written") is { } w)
        {
            written = ReadShares(w);
            w.CheckNoOthers();
        }
        c.CheckNoOthers();
        return new ContentMixModel(image, written, changed);
    }

    private static ContentShares ReadShares(YamlFields f)
    {
        var s = new ContentShares(f.Fraction("zero") ?? 0, f.Fraction("duplicate") ?? 0, f.Fraction("compressible") ?? 0);
        if (s.Zero + s.Duplicate + s.Compressible > 1 + 1e-9) throw f.Fail(f.Node, "zero", $"the shares add up to more than 1 ({s.Zero + s.Duplicate + s.Compressible:0.###})");
        return s;
    }

    private MigrationSpec ReadMigration(YamlFields f, YamlFields? defaults)
    {
        string vm = f.RequiredString("vm");
        if (!_vmByName.ContainsKey(vm)) throw f.Fail(f.Get("vm")!, "vm", $"no VM '{YamlFields.Printable(vm)}'");
        string to = Host(f, f.Required("to"), "to", f.RequiredString("to"));
        var at = f.Duration("at") ?? TimeSpan.Zero;
        var options = ReadOptions(f, defaults);
        f.CheckNoOthers();
        return new MigrationSpec(vm, to, at, options);
    }

    private List<EvacuationSpec> ReadEvacuations(YamlFields top, YamlFields? defaults)
    {
        var node = top.Get("evacuate");
        if (node is null) return [];
        var items = node is YamlSequenceNode seq ? seq.Children.Select((n, i) => new YamlFields(file, $"evacuate[{i}]", n)) : [new YamlFields(file, "evacuate", node)];
        var list = new List<EvacuationSpec>();
        foreach (var f in items)
        {
            string host = Host(f, f.Required("host"), "host", f.RequiredString("host"));
            var to = f.Strings("to");
            if (to.Count == 0) throw f.Fail(f.Node, "to", "missing (required): the hosts to move the VMs to");
            foreach (string t in to)
            {
                Host(f, f.Get("to")!, "to", t);
                if (t == host) throw f.Fail(f.Get("to")!, "to", $"'{t}' is the host being evacuated");
            }
            bool parallel = f.Choice("order", ("sequential", false), ("parallel", true)) ?? false;
            int max = f.Int("max-parallel", 1, 1_000_000) ?? int.MaxValue;
            if (!parallel && f.Has("max-parallel")) throw f.Fail(f.Get("max-parallel")!, "max-parallel", "only with order: parallel");
            var at = f.Duration("at") ?? TimeSpan.Zero;
            var options = ReadOptions(f, defaults);
            f.CheckNoOthers();
            list.Add(new EvacuationSpec(host, to, parallel, parallel ? max : 1, at, options));
        }
        return list;
    }

    /// <summary>The engine's options, each from the migration's own fields, else from defaults.</summary>
    internal SimMigrationOptions ReadOptions(YamlFields own, YamlFields? defaults)
    {
        YamlFields Src(string key) => own.Has(key) || defaults is null || !defaults.Has(key) ? own : defaults;
        var strategySrc = Src("strategy");
        var strategy = strategySrc.Choice("strategy", ("precopy", MigrationStrategy.PreCopy), ("postcopy", MigrationStrategy.PostCopy), ("hybrid", MigrationStrategy.Hybrid)) ?? MigrationStrategy.PreCopy;
        var o = new PreCopyOptions();
        if (Src("downtime-limit").Duration("downtime-limit") is { } dl) o = o with { DowntimeLimit = dl };
        if (Src("max-rounds").Int("max-rounds", 1, 100_000) is { } mr) o = o with { MaxRounds = mr };
        if (Src("timeout").Duration("timeout") is { } tb) o = o with { TimeBudget = tb };
        if (Src("defer-hot-pages").Bool("defer-hot-pages") is { } dh) o = o with { DeferHotPages = dh };
        if (Src("predictive-stop").Bool("predictive-stop") is { } ps) o = o with { PredictiveStop = ps };
        var acSrc = Src("auto-converge");
        if (acSrc.Get("auto-converge") is { } ac) o = o with { AutoConverge = ReadAutoConverge(acSrc, ac) };
        if (Src("dirty-limit").Number("dirty-limit", 1, 1e9, "page writes per second per vCPU, e.g. 2000") is { } lim) o = o with { DirtyLimit = lim };
        var stallSrc = Src("on-stall");
        var stall = stallSrc.Choice("on-stall", ("abort", StallAction.Abort), ("throttle", StallAction.Throttle), ("postcopy", StallAction.PostCopy), ("pause", StallAction.Pause));
        var maxSrc = Src("max-downtime");
        var max = maxSrc.Duration("max-downtime");
        if (stall is { } st) o = o with { OnStall = st };
        if (max is not null && o.OnStall != StallAction.Pause) throw maxSrc.Fail(maxSrc.Get("max-downtime")!, "max-downtime", "only with on-stall: pause (the longest pause it accepts)");
        if (o.OnStall == StallAction.Pause && max is null) throw stallSrc.Fail(stallSrc.Get("on-stall")!, "on-stall", "pause needs max-downtime: the longest pause accepted");
        if (max is { } m)
        {
            if (m < o.DowntimeLimit) throw maxSrc.Fail(maxSrc.Get("max-downtime")!, "max-downtime", $"shorter than the downtime limit ({o.DowntimeLimit.TotalMilliseconds:0} ms)");
            o = o with { MaxDowntime = m };
        }
        double cap = Src("bandwidth").Rate("bandwidth") ?? 0;
        var compress = Src("compress").Choice("compress", ("none", SimCompression.None), ("lz4", SimCompression.Lz4), ("zstd", SimCompression.Zstd), ("adaptive", SimCompression.Adaptive)) ?? SimCompression.None;
        var xbSrc = Src("xbzrle-cache");
        long xbzrle = xbSrc.Bytes("xbzrle-cache") ?? 0;
        if (xbzrle is > 0 and < GuestMemory.PageSize) throw xbSrc.Fail(xbSrc.Get("xbzrle-cache")!, "xbzrle-cache", "holds no page (at least 4KiB, or 0 for none)");
        bool dedup = Src("dedup").Bool("dedup") ?? false;
        try { o.Check(); }
        catch (ArgumentException e) { throw own.Fail(own.Node, "options", e.Message.Split('\n')[0]); }
        var postCopy = ReadPostCopy(Src, own, strategySrc, strategy, o);
        if (strategy == MigrationStrategy.PostCopy && (xbzrle > 0 || dedup))
        {
            var src = xbzrle > 0 ? xbSrc : Src("dedup");
            string key = xbzrle > 0 ? "xbzrle-cache" : "dedup";
            throw src.Fail(src.Get(key)!, key, "not with strategy: postcopy (each page is sent once while the VM runs at the destination: nothing for a delta or a reference to lean on; use hybrid)");
        }
        return new SimMigrationOptions { Strategy = strategy, PreCopy = o, PostCopy = postCopy, BandwidthCap = cap, Pipeline = new SimPipeline(compress, xbzrle, dedup) };
    }

    /// <summary>hybrid-budget (hybrid only) and prepaging (whenever the migration may switch to post-copy), the engine's post-copy options.</summary>
    private static PostCopyOptions ReadPostCopy(Func<string, YamlFields> src, YamlFields own, YamlFields strategySrc, MigrationStrategy strategy, PreCopyOptions o)
    {
        var p = new PostCopyOptions();
        var budgetSrc = src("hybrid-budget");
        if (budgetSrc.Map("hybrid-budget") is { } b)
        {
            if (strategy != MigrationStrategy.Hybrid) throw budgetSrc.Fail(budgetSrc.Get("hybrid-budget")!, "hybrid-budget", "only with strategy: hybrid");
            var h = new HybridOptions();
            if (b.Int("rounds", 0, 100_000) is { } r) h = h with { MaxRounds = r };
            if (b.Duration("time") is { } t) h = h with { TimeBudget = t };
            if (b.Bytes("bytes", 1) is { } by) h = h with { ByteBudget = by };
            b.CheckNoOthers();
            p = p with { Hybrid = h };
        }
        var prepSrc = src("prepaging");
        if (prepSrc.Bool("prepaging") is { } prep)
        {
            bool switches = strategy != MigrationStrategy.PreCopy || o.OnStall == StallAction.PostCopy;
            if (!switches) throw prepSrc.Fail(prepSrc.Get("prepaging")!, "prepaging", "only when the migration may switch to post-copy (strategy: postcopy or hybrid, or on-stall: postcopy)");
            p = p with { Prepaging = p.Prepaging with { Enabled = prep } };
        }
        if (strategy == MigrationStrategy.PostCopy)
        {
            // Pure post-copy has no rounds: their options, given with it (or by defaults that make every migration post-copy), would be ignored, so they are refused.
            foreach (string key in (string[])["downtime-limit", "max-rounds", "timeout", "on-stall", "max-downtime", "defer-hot-pages", "predictive-stop", "auto-converge", "dirty-limit"])
                foreach (var f in (YamlFields[])[own, strategySrc])
                    if (f.Get(key) is { } n) throw f.Fail(n, key, "not with strategy: postcopy (it has no pre-copy rounds)");
        }
        return p;
    }

    private static AutoConvergeOptions? ReadAutoConverge(YamlFields f, YamlNode node)
    {
        if (node is YamlScalarNode s)
        {
            return (s.Value ?? "").Trim().ToLowerInvariant() switch
            {
                "true" or "yes" or "on" => new AutoConvergeOptions(),
                "false" or "no" or "off" => null,
                _ => throw f.Fail(node, "auto-converge", "expected true, false, or {initial: 20%, increment: 10%, max: 99%}"),
            };
        }
        var m = new YamlFields(f.File, f.Field("auto-converge"), node);
        var d = new AutoConvergeOptions();
        var o = d with { Initial = m.Fraction("initial") ?? d.Initial, Increment = m.Fraction("increment") ?? d.Increment, Max = m.Fraction("max") ?? d.Max };
        m.CheckNoOthers();
        try { o.Check(); }
        catch (ArgumentException e) { throw f.Fail(node, "auto-converge", e.Message.Split('\n')[0]); }
        return o;
    }

    /// <summary>Every migration must have a route from where its VM will be to where it goes (checked for the VMs' first hosts; later moves are checked as they happen).</summary>
    private void CheckRoutes(Scenario s, YamlFields top)
    {
        var pairs = s.Links.Where(l => l.Between is not null).SelectMany(l => new[] { (l.Between!.Value.A, l.Between.Value.B), (l.Between.Value.B, l.Between.Value.A) })
            .Concat(s.Routes.Select(r => (r.From, r.To))).ToHashSet();
        foreach (var (m, n) in s.Migrations.Zip(top.List("migrations")))
        {
            string from = _vmByName[m.Vm].Host;
            if (from != m.To && !pairs.Contains((from, m.To)))
                throw YamlFields.Fail(file, n, "migrations", $"no route from {from} (where {m.Vm} starts) to {m.To}: give a link with between: [{from}, {m.To}] or a route");
        }
        foreach (var e in s.Evacuations)
            foreach (string t in e.To)
                if (!pairs.Contains((e.Host, t)))
                    throw YamlFields.Fail(file, top.Get("evacuate")!, "evacuate", $"no route from {e.Host} to {t}: give a link with between: [{e.Host}, {t}] or a route");
    }
}

/// <summary>Traces read once per path however many VMs replay them (a trace is read-only once loaded).</summary>
internal static class TraceCache
{
    private static readonly Dictionary<string, TraceFile> Loaded = [];
    private static readonly Lock Gate = new();

    public static TraceFile Load(string path)
    {
        string full = Path.GetFullPath(path);
        lock (Gate)
        {
            if (Loaded.TryGetValue(full, out var t)) return t;
            t = TraceFile.Load(full);
            if (Loaded.Count >= 64) Loaded.Clear(); // bounded
            Loaded[full] = t;
            return t;
        }
    }
}
