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
    private readonly CancellationTokenSource _cancel = new();

    public OutgoingMigration(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer = null)
    {
        if (!Migrations.NeedsPostCopyEngine(options)) _pre = new PreCopyMigration(vm, options, observer);
        else if (options.Streams > 1) throw new ArgumentException($"{Migrations.Name(options.Strategy)} uses one data connection; several streams ({options.Streams}) are for pre-copy only", nameof(options));
        else _post = new PostCopyMigration(vm, options, observer);
        Vm = vm;
        Options = options;
    }

    public IVirtualMachine Vm { get; }
    public MigrationOptions Options { get; }
    public Guid MigrationId => _pre?.MigrationId ?? _post!.MigrationId;
    public RateLimiter Limiter => _pre?.Limiter ?? _post!.Limiter;
    /// <summary>Where a dropped connection reconnects to; null until <see cref="MigrateTo"/> began.</summary>
    public ReconnectTarget? Target => _pre?.Target ?? _post!.Target;

    /// <summary>Connects to the destination agent and migrates; <paramref name="cancel"/> and <see cref="Cancel"/> both cancel.</summary>
    public MigrationReport MigrateTo(string host, int port, CancellationToken cancel = default)
    {
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(cancel, _cancel.Token);
        return _pre is not null ? _pre.MigrateTo(host, port, linked.Token) : _post!.MigrateTo(host, port, linked.Token);
    }

    /// <summary>Asks the migration to stop (any phase before the switch-over: the VM keeps running here); the answer is one line for the operator.</summary>
    public string Cancel()
    {
        _cancel.Cancel();
        return "ok: cancelling; the VM keeps running on the source";
    }
}
