namespace LiveMig.Engine;

/// <summary>Picks the source engine for <see cref="MigrationOptions.Strategy"/>.</summary>
public static class Migrations
{
    /// <summary>Pre-copy runs on <see cref="PreCopyMigration"/>, unless it may switch to post-copy on a stall: that, hybrid and post-copy need the page-request connection of <see cref="PostCopyMigration"/>.</summary>
    public static bool NeedsPostCopyEngine(MigrationOptions options) =>
        options.Strategy != MigrationStrategy.PreCopy || options.PreCopy.OnStall == Policies.StallAction.PostCopy;

    public static Reporting.MigrationReport MigrateTo(Vm.IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer, string host, int port, CancellationToken cancel = default) =>
        !NeedsPostCopyEngine(options)
            ? new PreCopyMigration(vm, options, observer).MigrateTo(host, port, cancel)
            : options.Streams > 1
                ? throw new ArgumentException($"{Name(options.Strategy)} uses one data connection; several streams ({options.Streams}) are for pre-copy only", nameof(options))
                : new PostCopyMigration(vm, options, observer).MigrateTo(host, port, cancel);

    public static string Name(MigrationStrategy s) => s switch
    {
        MigrationStrategy.PostCopy => "postcopy",
        MigrationStrategy.Hybrid => "hybrid",
        _ => "precopy",
    };
}
