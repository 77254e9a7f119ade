using LiveMig.DirtyTracking;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>Source-side settings of one migration.</summary>
public sealed record MigrationOptions
{
    public PreCopyOptions PreCopy { get; init; } = new();
    /// <summary>Bytes per second for all the migration's traffic; 0 = unlimited. Can be changed while running through <see cref="PreCopyMigration.Limiter"/>.</summary>
    public long BandwidthLimit { get; init; }
    /// <summary>Hash memory at pause and have the destination compare before it resumes.</summary>
    public bool Verify { get; init; } = true;
    /// <summary>A peer silent for this long is taken as gone.</summary>
    public TimeSpan IoTimeout { get; init; } = TimeSpan.FromSeconds(30);
    public TimeProvider Time { get; init; } = TimeProvider.System;
    /// <summary>TLS and authentication of the connection (default: plain TCP).</summary>
    public Transport.ChannelSecurity Security { get; init; } = Transport.ChannelSecurity.None;
    /// <summary>
    /// With certificates: the name the destination's certificate must carry (QEMU's
    /// tls-hostname), when the address connected to is an IP or another name than its
    /// certificate's; null: the host connected to.
    /// </summary>
    public string? TlsHostname { get; init; }
    /// <summary>Page-pipeline stages: compression, XBZRLE, dedup, free-page skipping (all off by default).</summary>
    public PipelineOptions Pipeline { get; init; } = new();
    public MigrationStrategy Strategy { get; init; } = MigrationStrategy.PreCopy;
    /// <summary>Post-copy and hybrid settings (PostCopyOptions.cs).</summary>
    public PostCopyOptions PostCopy { get; init; } = new();
    /// <summary>
    /// Pre-copy only: page data on this many data connections beside the control connection
    /// (like QEMU's multifd), each with its own encoder thread; 1 = everything on the one
    /// connection. At most <see cref="Protocol.StreamLayout.MaxStreams"/>.
    /// </summary>
    public int Streams { get; init; } = 1;
    /// <summary>Opens data connection i (0-based, already secured); tests wrap streams here to inject faults. Default: TCP to the MigrateTo address, secured like the control connection.</summary>
    public Func<int, Stream>? StreamConnector { get; init; }
    /// <summary>
    /// Pre-copy resume: after the connection drops before the switch-over, how long the source
    /// keeps reconnecting (bounded exponential back-off from <see cref="PostCopyOptions.FirstRetryDelay"/>
    /// to <see cref="PostCopyOptions.MaxRetryDelay"/>) to continue where it stopped; the VM keeps
    /// running meanwhile. 0 (the default) fails the migration at the first drop.
    /// </summary>
    public TimeSpan ReconnectWindow { get; init; }
}

/// <summary>Destination-side settings.</summary>
public sealed record DestinationOptions
{
    /// <summary>The clock every timestamp and duration of the destination's engine is read from.</summary>
    public TimeProvider Time { get; init; } = TimeProvider.System;
    /// <summary>Largest VM memory the destination accepts (default: the machine's memory).</summary>
    public long MaxMemoryBytes { get; init; } = MachineMemory.TotalBytes;
    /// <summary>
    /// The memory all incoming VMs together may claim (a <see cref="MigrationListener"/> uses one
    /// options object, so its migrations share it): each Hello reserves its VM's size before
    /// anything is allocated for it. Default: the machine's memory less a margin (<see cref="MemoryBudget.DefaultBytes"/>).
    /// </summary>
    public MemoryBudget MemoryBudget { get; init; } = new(MemoryBudget.DefaultBytes);
    public DirtyLogKind DirtyLog { get; init; } = DirtyLogKind.Auto;
    public TimeSpan IoTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>
    /// A listener drops a connection whose whole handshake — TLS and its first frame (Hello,
    /// Attach or StreamAttach) — is not done within this, however it trickles in. Sources send
    /// those frames without waiting for their bandwidth cap.
    /// </summary>
    public TimeSpan HandshakeTimeout { get; init; } = TimeSpan.FromSeconds(10);
    /// <summary>Most connections a listener takes through their handshake at once; more are closed at once and counted.</summary>
    public int MaxHandshakes { get; init; } = 128;
    /// <summary>TLS and authentication required of sources (default: plain TCP).</summary>
    public Transport.ChannelSecurity Security { get; init; } = Transport.ChannelSecurity.None;
    /// <summary>Memory prepared before migrations arrive; an incoming VM of a matching size takes a region from it.</summary>
    public Memory.MemoryPool? MemoryPool { get; init; }
    /// <summary>Fault announced extents in ahead of the pages on a helper thread (see <see cref="Memory.Prefaulter"/>); off only to measure what it buys.</summary>
    public bool Prefault { get; init; } = true;
    /// <summary>
    /// Pre-copy over one connection: place pages on a thread of their own while the connection's
    /// thread reads the next frame (<see cref="PlacingThread"/>); off: one thread reads and places.
    /// </summary>
    public bool PlacingThread { get; init; } = true;
    /// <summary>Also rehash all of memory from scratch before resuming and compare (slow: a full pass in the downtime; for tests and audits).</summary>
    public bool VerifyFromScratch { get; init; }
    /// <summary>Called with the VM just before it resumes, e.g. to move its network endpoint to it.</summary>
    public Action<IVirtualMachine>? BeforeResume { get; init; }
    /// <summary>Largest VM state (vCPU and device state, sent in chunks) a source may announce; a larger claim fails the migration before anything is allocated.</summary>
    public long MaxVmStateBytes { get; init; } = 256L << 20;
    /// <summary>
    /// The VM kinds this destination can run, one factory each (the Hello names the kind; any
    /// other is refused). Default: the built-in VM.
    /// </summary>
    public IReadOnlyList<IVmFactory> VmFactories { get; init; } = IVmFactory.Defaults;
    /// <summary>Capabilities this destination pretends not to have (e.g. <c>Capabilities.Zstd</c>, for tests of the refusal).</summary>
    public Capabilities Disabled { get; init; }
    /// <summary>
    /// The destination-wide dedup index: every migration received with these options (a
    /// <see cref="MigrationListener"/> uses one options object) indexes its pages here and can
    /// fill pages from the others' (gang migration).
    /// </summary>
    public DedupStore DedupStore { get; init; } = new();
    /// <summary>Post-copy settings (PostCopyOptions.cs).</summary>
    public PostCopyDestinationOptions PostCopy { get; init; } = new();
    /// <summary>Test hook: called on a data stream's thread when that stream (index) has placed every page of a round (round).</summary>
    public Action<int, int>? StreamRoundPlaced { get; init; }
    /// <summary>
    /// Pre-copy resume: when a source that asked for it loses its connection before Prepare, how
    /// long the partial VM is kept for it to reattach; 0 refuses resume (partial VMs are
    /// discarded at once).
    /// </summary>
    public TimeSpan ResumeWindow { get; init; } = TimeSpan.FromSeconds(60);
}

/// <summary>A migration that did not complete. <see cref="Report"/> says how far it got.</summary>
public sealed class MigrationFailedException(string message, MigrationReport report, Exception? inner = null) : Exception(message, inner)
{
    public MigrationReport Report { get; } = report;
}

/// <summary>What the engine tells whoever watches (the progress display, tests).</summary>
public interface IMigrationObserver
{
    void RoundStarted(int round, long pagesToSend, bool final) { }
    /// <summary>After each batch: pages sent in this round so far.</summary>
    void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire) { }
    void RoundCompleted(RoundReport round) { }
    void Phase(string phase) { }
}

public static class MachineMemory
{
    public static long TotalBytes
    {
        get
        {
            try
            {
                foreach (string line in File.ReadLines("/proc/meminfo"))
                    if (line.StartsWith("MemTotal:", StringComparison.Ordinal))
                        return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
            }
            catch (IOException) { }
            return GC.GetGCMemoryInfo().TotalAvailableMemoryBytes;
        }
    }
}
