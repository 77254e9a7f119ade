using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>Picks the source engine for <see cref="MigrationOptions.Strategy"/>.</summary>
public static class Migrations
{
    /// <summary>Pre-copy runs on <see cref="PreCopyMigration"/>, unless it may switch to post-copy on a stall: that, hybrid and post-copy need the page-request connection of <see cref="PostCopyMigration"/>.</summary>
    public static bool NeedsPostCopyEngine(MigrationOptions options) =>
        options.Strategy != MigrationStrategy.PreCopy || options.PreCopy.OnStall == Policies.StallAction.PostCopy;

    public static MigrationReport MigrateTo(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer, string host, int port, CancellationToken cancel = default) =>
        new OutgoingMigration(vm, options, observer).MigrateTo(host, port, cancel);

    public static string Name(MigrationStrategy s) => s switch
    {
        MigrationStrategy.PostCopy => "postcopy",
        MigrationStrategy.Hybrid => "hybrid",
        _ => "precopy",
    };
}

/// <summary>
/// One migration of a VM from here, on the engine its options call for, with what a control
/// socket needs while it runs: its ID, its bandwidth cap, where it reconnects, a way to cancel.
/// </summary>
public sealed class OutgoingMigration
{
    private readonly PreCopyMigration? _pre;
    private readonly PostCopyMigration? _post;

    public OutgoingMigration(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer = null)
    {
        if (!Migrations.NeedsPostCopyEngine(options)) _pre = new PreCopyMigration(vm, options, observer);
        else if (options.Streams > 1) throw new ArgumentException($"{Migrations.Name(options.Strategy)} uses one data connection; several streams ({options.Streams}) are for pre-copy only", nameof(options));
        else _post = new PostCopyMigration(vm, options, observer);
        Vm = vm;
        Options = options;
    }

    private OutgoingMigration(PostCopyMigration recovery, IVirtualMachine vm, MigrationOptions options) => (_post, Vm, Options) = (recovery, vm, options);

    /// <summary>
    /// A restarted source of post-copy migration <paramref name="migrationId"/> (its first source died
    /// after the switch): serves the waiting destination the pages it lacks from <paramref name="vm"/>'s memory.
    /// </summary>
    public static OutgoingMigration Recover(Guid migrationId, PausedMemoryVm vm, MigrationOptions options, IMigrationObserver? observer = null) =>
        new(PostCopyMigration.Recover(migrationId, vm, options, observer), vm, options);

    public IVirtualMachine Vm { get; }
    public MigrationOptions Options { get; }
    public Guid MigrationId => _pre?.MigrationId ?? _post!.MigrationId;
    public RateLimiter Limiter => _pre?.Limiter ?? _post!.Limiter;
    /// <summary>Where a dropped connection reconnects to; null until <see cref="MigrateTo"/> began.</summary>
    public ReconnectTarget? Target => _pre?.Target ?? _post!.Target;

    /// <summary>Connects to the destination agent and migrates; <paramref name="cancel"/> and <see cref="Cancel"/> both cancel (before the switch-over).</summary>
    public MigrationReport MigrateTo(string host, int port, CancellationToken cancel = default) =>
        _pre is not null ? _pre.MigrateTo(host, port, cancel) : _post!.MigrateTo(host, port, cancel);

    /// <summary>
    /// Cancels unless the switch-over has begun, decided atomically with it (<see cref="SwitchGate"/>),
    /// so the operator's one-line answer is true: cancelled (the VM keeps running here) or too late.
    /// </summary>
    public string Cancel() => SwitchGate.Describe(_pre?.TryCancel() ?? _post!.TryCancel());
}
