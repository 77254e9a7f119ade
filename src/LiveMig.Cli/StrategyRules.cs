using System.CommandLine;
using LiveMig.Engine;

namespace LiveMig.Cli;

/// <summary>
/// Which options a migration strategy cannot honour, and why: every option either takes effect
/// under a strategy or is refused there with one line naming the option and the strategy (exit
/// code 2) — never silently ignored. An option not listed here works under every strategy.
/// The test <c>CliStrategyMatrixTests</c> walks the README's options table against this.
/// </summary>
internal static class StrategyRules
{
    public sealed record Rule(Func<CliOptions, Option> Option, MigrationStrategy[] RefusedUnder, string Why);

    private static readonly MigrationStrategy[] PostCopyOnly = [MigrationStrategy.PostCopy];
    private const string NoRounds = "post-copy runs no pre-copy rounds (--strategy hybrid runs them before it switches)";

    public static readonly IReadOnlyList<Rule> Rules =
    [
        new(o => o.HybridBudget, [MigrationStrategy.PreCopy, MigrationStrategy.PostCopy], "only hybrid switches from pre-copy rounds to post-copy"),
        new(o => o.DowntimeLimit, PostCopyOnly, "post-copy has no stop-and-copy to bound: its downtime is the switch itself (the VM state and two round trips)"),
        new(o => o.MaxRounds, PostCopyOnly, NoRounds),
        new(o => o.DeferHotPages, PostCopyOnly, NoRounds),
        new(o => o.PredictiveStop, PostCopyOnly, NoRounds),
        new(o => o.AutoConverge, PostCopyOnly, NoRounds),
        new(o => o.DirtyLimit, PostCopyOnly, NoRounds),
        new(o => o.DirtyLog, PostCopyOnly, "post-copy tracks no writes on the source: the VM stops here at the switch"),
        new(o => o.XbzrleCache, PostCopyOnly, "post-copy sends each page once, so there is no copy at the destination to send a delta against"),
        new(o => o.Dedup, PostCopyOnly, "post-copy places pages while the VM runs at the destination, where a reference's holder page may have changed; use precopy or hybrid"),
        new(o => o.DemandPaging, [MigrationStrategy.PreCopy], "only post-copy and hybrid fetch missing pages on demand"),
        new(o => o.MaxDowntime, [MigrationStrategy.PostCopy, MigrationStrategy.Hybrid], "it bounds the pause of a stalled pre-copy (--on-stall pause)"),
        new(o => o.OnStall, [MigrationStrategy.PostCopy, MigrationStrategy.Hybrid], "hybrid always switches to post-copy when its rounds stall, and post-copy has no rounds"),
        new(o => o.Timeout, PostCopyOnly, NoRounds),
    ];

    /// <summary>Refuses, as a <see cref="UsageException"/>, the first option given on the command line that <paramref name="strategy"/> cannot honour.</summary>
    public static void Check(CliOptions o, ParseResult r, MigrationStrategy strategy, string strategyName)
    {
        foreach (var rule in Rules)
        {
            var option = rule.Option(o);
            if (Array.IndexOf(rule.RefusedUnder, strategy) >= 0 && r.GetResult(option) is { Implicit: false })
                throw new UsageException($"{option.Name}: not with --strategy {strategyName}: {rule.Why}");
        }
    }

    /// <summary>Whether a pipeline stage of <c>--optimize</c> applies under <paramref name="strategy"/> (<c>all</c> takes only those that do).</summary>
    public static bool StageApplies(string stage, MigrationStrategy strategy) =>
        strategy != MigrationStrategy.PostCopy || stage is not ("xbzrle" or "dedup");
}
