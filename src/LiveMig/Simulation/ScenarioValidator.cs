using System.Net;
using System.Text.Json;
using System.Text.Json.Serialization;
using LiveMig.Engine;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Simulation;

/// <summary>One side of a validation: what a migration came to, real or simulated.</summary>
/// <param name="Faults">Post-copy: the demand faults (pages requested); null when the migration did not switch.</param>
/// <param name="FaultP50Us">Post-copy: the faults' median latency, microseconds.</param>
public sealed record RunFigures(string Outcome, double TotalMs, double DowntimeMs, long BytesOnWire, int Rounds, string StopReason, string? Error = null, long? Faults = null, double? FaultP50Us = null)
{
    public static RunFigures Of(MigrationReport r) => new(r.Outcome, r.TotalTimeMs, r.DowntimeMs, r.BytesOnWire, r.Rounds.Count, r.StopReason, r.Error,
        r.PostCopyMs > 0 || r.PagesPushed > 0 || r.PagesRequested > 0 ? r.PagesRequested : null, r.FaultLatencyUs?.P50);
    public static RunFigures Of(SimMigrationResult r) => new(r.Outcome, r.TotalS * 1000, r.DowntimeMs, r.BytesOnWire, r.Rounds, r.StopReason, r.Error,
        r.SwitchedToPostCopy ? r.PagesRequested : null, r.FaultLatencyUs?.P50);
}

/// <summary>The simulator's relative error against the real run, (simulated − real) ÷ real; null where the real figure is 0.</summary>
public sealed record RelativeErrors(double? TotalTime, double? Downtime, double? Bytes, double? Rounds, double? Faults = null)
{
    public static RelativeErrors Between(RunFigures real, RunFigures simulated) => new(
        Relative(simulated.TotalMs, real.TotalMs), Relative(simulated.DowntimeMs, real.DowntimeMs),
        Relative(simulated.BytesOnWire, real.BytesOnWire), Relative(simulated.Rounds, real.Rounds),
        real.Faults is { } f && simulated.Faults is { } g ? Relative(g, f) : null);

    private static double? Relative(double simulated, double real) => real > 0 ? (simulated - real) / real : null;
}

/// <summary>One migration of the scenario, run for real and simulated.</summary>
public sealed record ValidatedMigration
{
    public required string Vm { get; init; }
    public string Strategy { get; init; } = "precopy";
    public required string Workload { get; init; }
    public required string Fill { get; init; }
    public long MemoryBytes { get; init; }
    /// <summary>The bandwidth cap both runs had (the scenario link's rate, or the migration's own cap if lower), bytes/s.</summary>
    public double CapBytesPerSecond { get; init; }
    public double WarmupS { get; init; }
    /// <summary>Page writes per second the real VM's vCPUs did in their warm-up (the model assumes the workload's rate).</summary>
    public double RealWritesPerSecond { get; init; }
    public required RunFigures Real { get; init; }
    public required RunFigures Simulated { get; init; }
    public required RelativeErrors Errors { get; init; }
    /// <summary>The real migration's memory check (null when it did not reach it).</summary>
    public bool? Verified { get; init; }
    public IReadOnlyList<RoundReport> RealRounds { get; init; } = [];
    public IReadOnlyList<RoundReport> SimulatedRounds { get; init; } = [];
}

/// <summary>A scenario validated: the loopback link both runs used, the machine's load, each migration.</summary>
public sealed record ValidationResult
{
    public required LoopbackLink Loopback { get; init; }
    /// <summary>The 1-minute load average before and after (/proc/loadavg; -1 unknown): a loaded machine's real runs are slower than its model.</summary>
    public double LoadBefore { get; init; }
    public double LoadAfter { get; init; }
    public int Cores { get; init; }
    public ulong Seed { get; init; }
    public required IReadOnlyList<ValidatedMigration> Migrations { get; init; }

    public string ToJson() => JsonSerializer.Serialize(this, ValidationJson.Default.ValidationResult);
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(ValidationResult))]
internal partial class ValidationJson : JsonSerializerContext;

/// <summary>
/// <c>livemig validate</c>: runs each migration of a scenario for real and in the simulator and
/// compares them. For real: a built-in VM as the scenario describes it (workload, fill, memory,
/// vCPUs, seed), warmed up until the migration's start time, migrated by the engine over
/// loopback TCP to an in-process destination agent with the engine's own bandwidth cap
/// (<see cref="Transport.RateLimiter"/>) set to the scenario link's rate, and verified.
/// Simulated: the same VM, seed and options on a link with the loopback's measured rate and
/// round trip and the same cap. Each migration runs alone (one loopback, one cap: sharing a link
/// is not validated this way).
/// </summary>
public static class ScenarioValidator
{
    /// <summary>Why the scenario cannot be validated (a <see cref="ScenarioException"/>), or nothing.</summary>
    public static void Check(Scenario s, string file)
    {
        if (s.Evacuations.Count > 0) throw new ScenarioException($"{file}: validate runs the migrations: list, not evacuate (it runs each migration alone)");
        var vms = s.Vms.SelectMany(v => v.Names().Select(n => (n, v))).ToDictionary(x => x.n, x => x.v);
        foreach (var m in s.Migrations)
        {
            var vm = vms[m.Vm];
            if (vm.BuiltIn is null) throw new ScenarioException($"{file}: VM {m.Vm}: validate runs built-in VMs only: give it workload: \"random:rate=…\" (a workload the built-in VM runs) and fill:");
            if (vm.Pages * Memory.GuestMemory.PageSize * 2 > MachineMemory.TotalBytes / 2)
                throw new ScenarioException($"{file}: VM {m.Vm}: {Units.Bytes(vm.Pages * Memory.GuestMemory.PageSize)} is too large to run twice (source and destination) in half this machine's memory");
            _ = LinkRate(s, vm.Host, m.To, file);
        }
    }

    /// <summary>The route's narrowest link: the rate the real run is capped to.</summary>
    private static double LinkRate(Scenario s, string from, string to, string file)
    {
        var route = s.Routes.FirstOrDefault(r => r.From == from && r.To == to);
        if (route is not null) return route.Via.Min(v => s.Links.First(l => l.Name == v).BytesPerSecond);
        var link = s.Links.FirstOrDefault(l => l.Between is var (a, b) && (a == from && b == to || a == to && b == from));
        return link?.BytesPerSecond ?? throw new ScenarioException($"{file}: no route from {from} to {to}");
    }

    public static ValidationResult Run(Scenario s, string file, ulong? seed = null, LoopbackLink? loopback = null, Action<string>? progress = null)
    {
        Check(s, file);
        double loadBefore = LoadAverage();
        var link = loopback ?? LoopbackLink.Measure();
        progress?.Invoke($"loopback: {Units.Rate(link.BytesPerSecond)} uncapped, round trip {link.RoundTrip.TotalMicroseconds:0} µs");
        ulong runSeed = seed ?? s.Seed;
        var seeds = ScenarioRunner.VmSeeds(s, runSeed);
        var vms = s.Vms.SelectMany(v => v.Names().Select(n => (n, v))).ToDictionary(x => x.n, x => x.v);
        progress?.Invoke("warm-up migration (untimed): compiles the engine's code, as in a long-running agent");
        WarmUp(s.Migrations.Any(m => m.Options.MaySwitch));
        var results = new List<ValidatedMigration>();
        foreach (var m in s.Migrations)
        {
            var spec = vms[m.Vm] with { Name = m.Vm, Count = 1, Seed = seeds[m.Vm] };
            double cap = LinkRate(s, spec.Host, m.To, file);
            if (m.Options.BandwidthCap > 0) cap = Math.Min(cap, m.Options.BandwidthCap);
            var options = m.Options with { BandwidthCap = cap };
            progress?.Invoke($"{m.Vm}: real run ({spec.BuiltIn}, {Units.Bytes(spec.Pages * Memory.GuestMemory.PageSize)}, cap {Units.Rate(cap)})");
            var (real, writes) = RunReal(spec, options, m.At);
            progress?.Invoke($"{m.Vm}: simulated");
            var simulated = Simulate(spec, options, m.At, link, runSeed);
            var r = RunFigures.Of(real);
            var sim = RunFigures.Of(simulated);
            results.Add(new ValidatedMigration
            {
                Vm = m.Vm, Strategy = Migrations.Name(m.Options.Strategy), Workload = spec.BuiltIn!, Fill = spec.Fill.ToString().ToLowerInvariant(),
                MemoryBytes = spec.Pages * Memory.GuestMemory.PageSize, CapBytesPerSecond = cap, WarmupS = m.At.TotalSeconds,
                RealWritesPerSecond = writes, Real = r, Simulated = sim, Errors = RelativeErrors.Between(r, sim),
                Verified = real.Verified, RealRounds = real.Rounds, SimulatedRounds = simulated.RoundDetails,
            });
        }
        return new ValidationResult
        {
            Loopback = link, LoadBefore = loadBefore, LoadAfter = LoadAverage(), Cores = Environment.ProcessorCount,
            Seed = runSeed, Migrations = results,
        };
    }

    /// <summary>The simulated side: the VM on a two-host scenario whose one link is the measured loopback.</summary>
    public static SimMigrationResult Simulate(VmSpec vm, SimMigrationOptions options, TimeSpan at, LoopbackLink link, ulong seed)
    {
        const string Source = "source", Destination = "destination";
        var scenario = new Scenario
        {
            Seed = seed,
            Hosts = [Source, Destination],
            Links = [new LinkSpec("loopback", link.BytesPerSecond, link.RoundTrip / 2, (Source, Destination))],
            Vms = [vm with { Host = Source }],
            Migrations = [new MigrationSpec(vm.Name, Destination, at, options)],
        };
        return ScenarioRunner.Run(scenario).Migrations[0];
    }

    /// <summary>The engine's options for the simulator's: the same strategy, pre-copy and post-copy options, the cap as the rate limiter, the same pipeline stages.</summary>
    public static MigrationOptions EngineOptions(SimMigrationOptions o) => new()
    {
        Strategy = o.Strategy,
        PreCopy = o.PreCopy,
        PostCopy = o.PostCopy,
        BandwidthLimit = (long)Math.Round(o.BandwidthCap),
        Pipeline = new PipelineOptions
        {
            Compression = o.Pipeline.Compression switch
            {
                SimCompression.Lz4 => CompressionKind.Lz4,
                SimCompression.Zstd => CompressionKind.Zstd,
                SimCompression.Adaptive => CompressionKind.Adaptive,
                _ => CompressionKind.None,
            },
            XbzrleCacheBytes = o.Pipeline.XbzrleCacheBytes,
            Dedup = o.Pipeline.Dedup,
        },
    };

    /// <summary>The real side: a built-in VM, warmed up, migrated over loopback to an agent in this process; returns the source's report and the page writes per second its vCPUs did while warming up.</summary>
    public static (MigrationReport Report, double WritesPerSecond) RunReal(VmSpec spec, SimMigrationOptions options, TimeSpan warmup)
    {
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions());
        listener.Arrived += a => arrived.TrySetResult(a);
        listener.Start();
        using var vm = BuiltInVm.Create(new VmConfig
        {
            Name = spec.Name, MemoryBytes = spec.Pages * Memory.GuestMemory.PageSize, Vcpus = spec.Vcpus,
            Workload = spec.BuiltIn!, Seed = spec.Seed ?? 1, Fill = spec.Fill,
        });
        vm.Start();
        long ops = vm.Operations, t0 = System.Diagnostics.Stopwatch.GetTimestamp();
        if (warmup > TimeSpan.Zero) Thread.Sleep(warmup); // the guest runs until the migration's start time, as in the scenario
        double writes = (vm.Operations - ops) / Math.Max(System.Diagnostics.Stopwatch.GetElapsedTime(t0).TotalSeconds, 1e-9);
        MigrationReport report;
        try { report = new OutgoingMigration(vm, EngineOptions(options)).MigrateTo("127.0.0.1", listener.Port); }
        catch (MigrationFailedException e) { return (e.Report, writes); }
        // The arrived VM is the destination's: stop it before the listener frees its memory.
        if (arrived.Task.Wait(TimeSpan.FromSeconds(30))) arrived.Task.Result.Vm.Stop();
        return (report, writes);
    }

    /// <summary>
    /// One untimed migration of a small VM first: the first migration in a process pays the JIT
    /// and first-use costs of the engine's code (a few hundred milliseconds here), which neither an
    /// agent that has run before nor the model has.
    /// </summary>
    /// <param name="postCopy">Also one of hybrid (its rounds, then post-copy's switch, push and fault service).</param>
    public static void WarmUp(bool postCopy = false)
    {
        var vm = new VmSpec { Name = "validate-warmup", Host = "source", Pages = (64L << 20) / Memory.GuestMemory.PageSize, BuiltIn = "random:rate=2000", Fill = MemoryFill.Mixed, Seed = 1 };
        foreach (var o in postCopy ? [new SimMigrationOptions(), new SimMigrationOptions { Strategy = MigrationStrategy.Hybrid }] : new[] { new SimMigrationOptions() })
        {
            var (report, _) = RunReal(vm, o, TimeSpan.FromMilliseconds(100));
            if (report.Outcome != "completed") throw new InvalidOperationException($"the warm-up migration over loopback failed: {report.Error}");
        }
    }

    private static double LoadAverage()
    {
        try { return double.Parse(File.ReadAllText("/proc/loadavg").Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or FormatException) { return -1; }
    }
}
