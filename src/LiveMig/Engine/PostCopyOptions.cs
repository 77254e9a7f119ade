using LiveMig.Policies;

namespace LiveMig.Engine;

/// <summary>How the source moves the VM: pre-copy, post-copy, or pre-copy rounds then post-copy.</summary>
public enum MigrationStrategy { PreCopy, PostCopy, Hybrid }

/// <summary>Source-side settings of post-copy and hybrid migrations.</summary>
public sealed record PostCopyOptions
{
    /// <summary>When hybrid switches to post-copy.</summary>
    public HybridOptions Hybrid { get; init; } = new();
    public PrepagingOptions Prepaging { get; init; } = new();
    /// <summary>Pages per background-push frame: small, so a requested page never waits long behind one (64 KiB).</summary>
    public int PushBatchPages { get; init; } = 16;
    /// <summary>
    /// After a connection failure in post-copy, how long the source reconnects with back-off
    /// before it calls itself post-copy paused; it never gives up on its own after the switch
    /// (docs/reliability.md, "Post-copy: never lose a VM").
    /// </summary>
    public TimeSpan RecoveryTimeout { get; init; } = TimeSpan.FromSeconds(60);
    /// <summary>First wait between reconnection attempts; doubles up to <see cref="MaxRetryDelay"/>.</summary>
    public TimeSpan FirstRetryDelay { get; init; } = TimeSpan.FromMilliseconds(20);
    public TimeSpan MaxRetryDelay { get; init; } = TimeSpan.FromSeconds(2);
    /// <summary>
    /// Send buffer of the main connection after the switch (bytes; 0 = the kernel's). A request
    /// for a page the push already sent is answered again on the page-request connection, but
    /// the push still reaches the destination behind everything queued before it: a small queue
    /// keeps the bytes sent twice few. Raise it for links with a large bandwidth-delay product.
    /// </summary>
    public int PushSocketBuffer { get; init; } = 128 << 10;
}

/// <summary>How the destination finds out that a vCPU touched a page that has not arrived.</summary>
public enum DemandPagingMode
{
    /// <summary>userfaultfd where the kernel, the native helper and the transport allow it (plain TCP), else portable with a note.</summary>
    Auto,
    /// <summary>A present bitmap checked on the vCPU access path; works everywhere.</summary>
    Portable,
    /// <summary>userfaultfd MISSING registration served by the native helper (fails the migration when unavailable).</summary>
    Userfaultfd,
}

/// <summary>Destination-side settings of post-copy.</summary>
public sealed record PostCopyDestinationOptions
{
    public DemandPagingMode Mode { get; init; } = DemandPagingMode.Auto;
    /// <summary>
    /// After a connection failure in post-copy, how long the destination waits for the source to
    /// reconnect before it discards the VM (saying which pages were lost). Infinite by default:
    /// the VM runs here with pages missing (vCPUs that touch one wait) until its source recovers
    /// or an operator discards it (<see cref="DestinationSessions.DiscardPostCopy"/>).
    /// </summary>
    public TimeSpan RecoveryTimeout { get; init; } = Timeout.InfiniteTimeSpan;
    /// <summary>
    /// userfaultfd mode: the vCPU access path still checks the present bitmap and takes a missing
    /// page through a system call (madvise populate), so a garbage collection never waits for a
    /// vCPU stuck in a fault even while the connection is down. False leaves every access to the
    /// kernel's fault path (raw pointer faults served by the native thread).
    /// </summary>
    public bool CheckAccess { get; init; } = true;
    /// <summary>Told (one line) when <see cref="DemandPagingMode.Auto"/> falls back to the portable pager, and why.</summary>
    public Action<string>? Note { get; init; }
    /// <summary>Receive buffer of the main connection after the switch (bytes; 0 = the kernel's); see <see cref="PostCopyOptions.PushSocketBuffer"/>.</summary>
    public int PushSocketBuffer { get; init; } = 128 << 10;
}
