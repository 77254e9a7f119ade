using LiveMig.Engine;
using LiveMig.Pipeline;

namespace LiveMig.Cli;

/// <summary>
/// What <c>--optimize</c> can turn on, by name. <c>--optimize all</c> applies every entry, in
/// order; explicit options (e.g. <c>--compress lz4</c>) then override. A new optimisation is one
/// more entry here (and its own option in <see cref="CliOptions"/>).
/// </summary>
internal static class Optimizations
{
    public sealed record Entry(string Name, string Description, Func<MigrationOptions, MigrationOptions> Apply);

    public static readonly List<Entry> Known =
    [
        new("compress", "adaptive compression (raw, LZ4 or Zstd per page; none while the CPU is the bottleneck)",
            o => o with { Pipeline = o.Pipeline with { Compression = CompressionKind.Adaptive } }),
        new("xbzrle", $"XBZRLE deltas of re-sent pages ({Units.Bytes(PipelineOptions.DefaultXbzrleCacheBytes)} cache)",
            o => o with { Pipeline = o.Pipeline with { XbzrleCacheBytes = PipelineOptions.DefaultXbzrleCacheBytes } }),
        new("dedup", "deduplication within the VM and across VMs sent to the same destination",
            o => o with { Pipeline = o.Pipeline with { Dedup = true } }),
        new("free-pages", "skip pages the guest reports free",
            o => o with { Pipeline = o.Pipeline with { SkipFreePages = true } }),
    ];

    public static string Names => string.Join(", ", Known.Select(e => e.Name));

    /// <summary>
    /// Applies <c>all</c>, <c>none</c>, or a comma-separated list of names. <c>all</c> takes every
    /// optimisation <paramref name="strategy"/> can use; a name it cannot use is refused.
    /// </summary>
    public static MigrationOptions Apply(string spec, MigrationOptions options, MigrationStrategy strategy = MigrationStrategy.PreCopy, string strategyName = "precopy")
    {
        string s = spec.Trim().ToLowerInvariant();
        if (s is "none" or "") return options;
        if (s == "all") return Known.Where(e => StrategyRules.StageApplies(e.Name, strategy)).Aggregate(options, (o, e) => e.Apply(o));
        foreach (string name in s.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var e = Known.FirstOrDefault(k => k.Name == name)
                ?? throw new UsageException($"--optimize '{spec}': unknown optimisation '{name}' (known: all, none, {Names})");
            if (!StrategyRules.StageApplies(name, strategy))
                throw new UsageException($"--optimize: '{name}' not with --strategy {strategyName}: post-copy sends each page once while the VM runs at the destination");
            options = e.Apply(options);
        }
        return options;
    }
}
