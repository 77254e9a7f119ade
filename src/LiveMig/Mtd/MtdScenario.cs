using LiveMig.Simulation;

namespace LiveMig.Mtd;

/// <summary>How a new VM (a benign tenant's, an attacker's, the victim at the start) is given a host.</summary>
public enum Placement
{
    /// <summary>Uniformly among the hosts with a free slot.</summary>
    Random,
    /// <summary>The host with the fewest VMs (ties: at random).</summary>
    LeastLoaded,
    /// <summary>The first host, in order, with a free slot: sequential placement, the locality Ristenpart et al. exploited.</summary>
    Pack,
}

/// <summary>Where a defensive move sends the victim.</summary>
public enum DestinationChoice
{
    Random,
    LeastLoaded,
    /// <summary>As far as possible from the hosts where the detector flagged suspects (other rack, then other host), then least loaded.</summary>
    AttackerAware,
}

public enum PolicyKind
{
    /// <summary>No defence: the baseline.</summary>
    None,
    Periodic,
    Poisson,
    /// <summary>Move on each detector alarm.</summary>
    Threat,
    /// <summary>Move at the first cheap moment (by the migration model) after a minimum interval, and at a maximum interval whatever it costs.</summary>
    CostAware,
}

/// <summary>A link between two hosts: what the migration model carries a move over.</summary>
public sealed record LinkModel(double BytesPerSecond, TimeSpan Latency);

/// <summary>The cloud: hosts in racks, each with so many VM slots, a background load of benign VMs, a placement policy.</summary>
public sealed record CloudSpec
{
    public int Hosts { get; init; } = 10;
    public int Racks { get; init; } = 1;
    public int Slots { get; init; } = 8;
    /// <summary>Share of all slots filled by benign VMs at the start (they stay: no churn).</summary>
    public double Load { get; init; } = 0.5;
    public Placement Placement { get; init; } = Placement.Random;
    /// <summary>Between two hosts of one rack.</summary>
    public LinkModel Link { get; init; } = new(10e9 / 8, TimeSpan.FromMilliseconds(0.1));
    /// <summary>Between racks (default: as <see cref="Link"/>).</summary>
    public LinkModel? CrossRackLink { get; init; }

    public int RackOf(int host) => (int)((long)host * Racks / Hosts);
}

/// <summary>The VM defended: its memory, workload and content, as in the simulator, and how its moves migrate.</summary>
public sealed record VictimSpec
{
    public required long Pages { get; init; }
    public int Vcpus { get; init; } = 1;
    public long StateBytes { get; init; } = 64 << 10;
    /// <summary>The hand dirty model's phases (null: a trace drives it).</summary>
    public IReadOnlyList<DirtyPhase>? Phases { get; init; }
    /// <summary>The phases repeat with this period (a daily cycle); null: the last phase lasts for ever.</summary>
    public TimeSpan? Cycle { get; init; }
    public ContentMixModel? Content { get; init; }
    /// <summary>A recorded trace (absolute path), replayed in a loop.</summary>
    public string? Trace { get; init; }
    /// <summary>With a trace: the cost of a move is simulated from offsets this far apart in the trace.</summary>
    public TimeSpan CostStep { get; init; } = TimeSpan.FromSeconds(10);
    public SimMigrationOptions Migration { get; init; } = new();
}

/// <summary>
/// The attacker (Ristenpart et al., CCS 2009): launches VMs, one every <see cref="LaunchEvery"/>
/// while it has fewer than <see cref="MaxVms"/>; each is placed by the cloud's placement policy
/// and, once up (<see cref="LaunchTime"/>), checks whether it landed beside the victim: if not it
/// is terminated; if so it stays and attacks, and succeeds after <see cref="AttackTime"/> of
/// unbroken co-residency. When the victim leaves, the attacker notices and terminates it.
/// </summary>
public sealed record AttackerSpec
{
    public TimeSpan Start { get; init; }
    public TimeSpan LaunchEvery { get; init; } = TimeSpan.FromMinutes(10);
    /// <summary>Launch times as a Poisson process of that mean instead of a fixed step.</summary>
    public bool PoissonLaunches { get; init; }
    public TimeSpan LaunchTime { get; init; } = TimeSpan.FromMinutes(1);
    public int MaxVms { get; init; } = 1;
    /// <summary>Launches in all (a budget); long.MaxValue: unbounded.</summary>
    public long MaxLaunches { get; init; } = long.MaxValue;
    public required TimeSpan AttackTime { get; init; }
}

/// <summary>A detector that looks at the victim's host every <see cref="CheckEvery"/>: alarms with probability <see cref="TruePositive"/> when an attacker is there, <see cref="FalsePositive"/> when none is.</summary>
public sealed record DetectorSpec(TimeSpan CheckEvery, double TruePositive, double FalsePositive)
{
    /// <summary>How long a flagged host stays suspect (for attacker-aware destinations).</summary>
    public TimeSpan Memory { get; init; } = TimeSpan.FromDays(1);
}

/// <summary>One defence configuration of the sweep: a policy, its interval, a destination choice.</summary>
public sealed record PolicySpec
{
    public required PolicyKind Kind { get; init; }
    /// <summary>Periodic: the interval; Poisson: the mean; cost-aware: the longest interval.</summary>
    public TimeSpan Interval { get; init; }
    /// <summary>Cost-aware: the shortest interval between moves.</summary>
    public TimeSpan MinInterval { get; init; }
    /// <summary>Cost-aware: how often the cost is looked at.</summary>
    public TimeSpan CheckEvery { get; init; } = TimeSpan.FromMinutes(5);
    /// <summary>Cost-aware: a moment is cheap when the predicted cost is within this share above the cheapest of the workload's cycle.</summary>
    public double CheapWithin { get; init; } = 0.2;
    /// <summary>Cost-aware: which cost it minimises.</summary>
    public CostMetric CheapBy { get; init; } = CostMetric.Bytes;
    public DestinationChoice Destination { get; init; } = DestinationChoice.Random;

    public string Label => Kind switch
    {
        PolicyKind.None => "none",
        PolicyKind.Periodic => $"periodic {MtdUnits.Duration(Interval)}",
        PolicyKind.Poisson => $"poisson {MtdUnits.Duration(Interval)}",
        PolicyKind.Threat => "threat",
        PolicyKind.CostAware => $"cost-aware {MtdUnits.Duration(MinInterval)}..{MtdUnits.Duration(Interval)}",
        _ => Kind.ToString(),
    } + (Kind == PolicyKind.None ? "" : $" → {DestinationName(Destination)}");

    public static string DestinationName(DestinationChoice d) => d switch
    {
        DestinationChoice.LeastLoaded => "least-loaded",
        DestinationChoice.AttackerAware => "attacker-aware",
        _ => "random",
    };
}

/// <summary>A cost axis: per hour of defended time.</summary>
public enum CostMetric { Migrations, Bytes, Downtime, Degradation }

/// <summary>
/// A moving-target-defence scenario (docs/mtd.md): the cloud, the victim, the attacker, an
/// optional detector and the defence configurations to compare, each run <see cref="Runs"/>
/// times for <see cref="Horizon"/> of virtual time.
/// </summary>
public sealed record MtdScenario
{
    public ulong Seed { get; init; } = 1;
    public int Runs { get; init; } = 200;
    public TimeSpan Horizon { get; init; } = TimeSpan.FromDays(7);
    public CloudSpec Cloud { get; init; } = new();
    public required VictimSpec Victim { get; init; }
    public required AttackerSpec Attacker { get; init; }
    public DetectorSpec? Detector { get; init; }
    public required IReadOnlyList<PolicySpec> Policies { get; init; }
    /// <summary>The cost axis of the Pareto front and the figure.</summary>
    public CostMetric ParetoCost { get; init; } = CostMetric.Downtime;

    public static MtdScenario Load(string path) => MtdScenarioReader.Load(path);

    public static MtdScenario Parse(string yaml, string file = "scenario", string? directory = null) => MtdScenarioReader.Parse(yaml, file, directory);
}

/// <summary>Durations as the scenarios write them: us, ms, s, m, h, d.</summary>
public static class MtdUnits
{
    public static bool TryParseDuration(string text, out TimeSpan value) => YamlFields.TryParseDuration(text, out value);

    /// <summary>A duration the short way, in the largest unit it is a whole number of: 90s, 110m, 2h, 7d.</summary>
    public static string Duration(TimeSpan t)
    {
        if (t <= TimeSpan.Zero) return "0s";
        if (t.Ticks % TimeSpan.TicksPerDay == 0) return $"{t.TotalDays:0}d";
        if (t.Ticks % TimeSpan.TicksPerHour == 0) return $"{t.TotalHours:0}h";
        if (t.Ticks % TimeSpan.TicksPerMinute == 0) return $"{t.TotalMinutes:0}m";
        if (t.Ticks % TimeSpan.TicksPerSecond == 0) return $"{t.TotalSeconds:0}s";
        return t.TotalSeconds < 1 ? $"{t.TotalMilliseconds:0.###}ms" : $"{t.TotalSeconds:0.###}s";
    }

    public static string KindName(PolicyKind k) => k == PolicyKind.CostAware ? "cost-aware" : k.ToString().ToLowerInvariant();
}
