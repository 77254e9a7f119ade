using System.Text.Json;
using System.Text.Json.Serialization;
using LiveMig.Workloads;

namespace LiveMig.Mtd;

/// <summary>A point of the curve P(compromised by t).</summary>
public sealed record CompromisePoint(double Hours, double Share);

/// <summary>One defence configuration over all its runs: security and cost per hour of defended time.</summary>
public sealed record MtdSummary
{
    public required string Policy { get; init; }
    public required string Kind { get; init; }
    public double IntervalS { get; init; }
    public double MinIntervalS { get; init; }
    public string Destination { get; init; } = "";
    public int Runs { get; init; }
    public int Compromised { get; init; }
    /// <summary>Share of runs in which the attack succeeded within the horizon, with its 95% Wilson interval.</summary>
    public double SuccessProbability { get; init; }
    public double SuccessLow { get; init; }
    public double SuccessHigh { get; init; }
    /// <summary>Mean time to compromise over the compromised runs (hours); null if none was.</summary>
    public double? MeanTimeToCompromiseH { get; init; }
    public double MovesPerHour { get; init; }
    public double FailedMovesPerHour { get; init; }
    public double SkippedMovesPerHour { get; init; }
    public double BytesPerHour { get; init; }
    public double DowntimeMsPerHour { get; init; }
    public double DegradationSPerHour { get; init; }
    /// <summary>Share of the time the victim spent migrating.</summary>
    public double MigratingShare { get; init; }
    public double EpisodesPerRun { get; init; }
    public double TrueAlarmsPerHour { get; init; }
    public double FalseAlarmsPerHour { get; init; }
    /// <summary>On the Pareto front of (success probability, the scenario's cost axis): no other configuration is at least as good on both and better on one.</summary>
    public bool Pareto { get; init; }
    public IReadOnlyList<CompromisePoint> CompromisedBy { get; init; } = [];

    public double Cost(CostMetric m) => m switch
    {
        CostMetric.Migrations => MovesPerHour + FailedMovesPerHour,
        CostMetric.Bytes => BytesPerHour,
        CostMetric.Downtime => DowntimeMsPerHour,
        _ => DegradationSPerHour,
    };
}

/// <summary>What one move costs in one state of the victim's workload (the migration model's answer, per link).</summary>
public sealed record MoveCostRow(int State, string Link, double TotalS, double DowntimeMs, long Bytes, double DegradationS, string Outcome, int Rounds);

public sealed record MtdResult
{
    public ulong Seed { get; init; }
    public int Runs { get; init; }
    public double HorizonH { get; init; }
    public double AttackTimeH { get; init; }
    public string ParetoCost { get; init; } = "";
    public required IReadOnlyList<MtdSummary> Configurations { get; init; }
    public required IReadOnlyList<MoveCostRow> MoveCosts { get; init; }
    /// <summary>Migrations the cost model simulated (the rest of the moves came from its cache).</summary>
    public int MigrationsSimulated { get; init; }

    public string ToJson(bool indented = false) => JsonSerializer.Serialize(this, indented ? MtdJson.Indented.MtdResult : MtdJson.Default.MtdResult);
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(MtdResult))]
internal partial class MtdJson : JsonSerializerContext
{
    public static MtdJson Indented { get; } = new(new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase });
}

/// <summary>
/// Runs every defence configuration of a scenario <see cref="MtdScenario.Runs"/> times (run i of
/// every configuration meets the same attacker: common random numbers, so differences between
/// policies are not noise between attackers), sums security and cost, and marks the Pareto front.
/// One thread, seeded: the same scenario and seed give the same result.
/// </summary>
public static class MtdSweep
{
    private const int CurvePoints = 24;

    public static MtdResult Run(MtdScenario s, ulong? seed = null)
    {
        ulong root = seed ?? s.Seed;
        var costs = new MoveCostModel(s.Victim, root);
        var runSeeds = new ulong[s.Runs];
        ulong mix = root;
        for (int i = 0; i < runSeeds.Length; i++) runSeeds[i] = Xoshiro256.SplitMix(ref mix);
        var summaries = s.Policies.Select(p => Summarise(s, p, runSeeds.Select(r => new MtdRun(s, p, costs, r).Run()).ToList())).ToList();
        summaries = MarkPareto(summaries, s.ParetoCost);
        return new MtdResult
        {
            Seed = root, Runs = s.Runs, HorizonH = s.Horizon.TotalHours, AttackTimeH = s.Attacker.AttackTime.TotalHours,
            ParetoCost = s.ParetoCost.ToString().ToLowerInvariant(), Configurations = summaries, MoveCosts = CostRows(s, costs),
            MigrationsSimulated = costs.Simulated,
        };
    }

    private static List<MoveCostRow> CostRows(MtdScenario s, MoveCostModel costs)
    {
        var links = new List<(string, LinkModel)> { ("rack", s.Cloud.Link) };
        if (s.Cloud.CrossRackLink is { } x) links.Add(("cross-rack", x));
        return [.. links.SelectMany(l => Enumerable.Range(0, costs.States).Select(st =>
        {
            var c = costs.Cost(st, l.Item2);
            return new MoveCostRow(st, l.Item1, c.TotalS, c.DowntimeMs, c.Bytes, c.DegradationS, c.Outcome, c.Rounds);
        }))];
    }

    public static MtdSummary Summarise(MtdScenario s, PolicySpec p, IReadOnlyList<MtdRunResult> runs)
    {
        int n = runs.Count, k = runs.Count(r => r.Compromised);
        double hours = runs.Sum(r => r.ElapsedS) / 3600;
        double PerHour(double x) => hours > 0 ? x / hours : 0;
        var (lo, hi) = Wilson(k, n);
        var ttc = runs.Where(r => r.Compromised).Select(r => r.CompromiseS!.Value).ToList();
        return new MtdSummary
        {
            Policy = p.Label, Kind = MtdUnits.KindName(p.Kind), IntervalS = p.Interval.TotalSeconds, MinIntervalS = p.MinInterval.TotalSeconds,
            Destination = p.Kind == PolicyKind.None ? "" : PolicySpec.DestinationName(p.Destination),
            Runs = n, Compromised = k, SuccessProbability = n > 0 ? (double)k / n : 0, SuccessLow = lo, SuccessHigh = hi,
            MeanTimeToCompromiseH = ttc.Count > 0 ? ttc.Average() / 3600 : null,
            MovesPerHour = PerHour(runs.Sum(r => r.Moves)), FailedMovesPerHour = PerHour(runs.Sum(r => r.FailedMoves)),
            SkippedMovesPerHour = PerHour(runs.Sum(r => r.SkippedMoves)), BytesPerHour = PerHour(runs.Sum(r => (double)r.Bytes)),
            DowntimeMsPerHour = PerHour(runs.Sum(r => r.DowntimeMs)), DegradationSPerHour = PerHour(runs.Sum(r => r.DegradationS)),
            MigratingShare = hours > 0 ? runs.Sum(r => r.MigratingS) / 3600 / hours : 0,
            EpisodesPerRun = n > 0 ? runs.Average(r => r.Episodes) : 0,
            TrueAlarmsPerHour = PerHour(runs.Sum(r => r.TrueAlarms)), FalseAlarmsPerHour = PerHour(runs.Sum(r => r.FalseAlarms)),
            CompromisedBy = Curve(s.Horizon.TotalSeconds, ttc, n),
        };
    }

    private static List<CompromisePoint> Curve(double horizonS, List<double> ttc, int n)
    {
        var sorted = ttc.Order().ToArray();
        return [.. Enumerable.Range(1, CurvePoints).Select(i =>
        {
            double t = horizonS * i / CurvePoints;
            int by = sorted.Count(x => x <= t);
            return new CompromisePoint(t / 3600, n > 0 ? (double)by / n : 0);
        })];
    }

    /// <summary>The 95% Wilson score interval of k successes in n trials (sound near 0 and 1, where the normal one is not).</summary>
    public static (double Low, double High) Wilson(int k, int n)
    {
        if (n == 0) return (0, 1);
        const double z = 1.959963984540054;
        double p = (double)k / n, z2n = z * z / n;
        double centre = (p + z2n / 2) / (1 + z2n), half = z * Math.Sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n);
        return (Math.Max(0, centre - half), Math.Min(1, centre + half));
    }

    /// <summary>Marks the configurations no other beats on both security (lower success probability) and cost (lower on the axis).</summary>
    public static List<MtdSummary> MarkPareto(List<MtdSummary> all, CostMetric axis) =>
        [.. all.Select(a => a with
        {
            Pareto = !all.Any(b => b.SuccessProbability <= a.SuccessProbability && b.Cost(axis) <= a.Cost(axis)
                                   && (b.SuccessProbability < a.SuccessProbability || b.Cost(axis) < a.Cost(axis))),
        })];
}
