using LiveMig.DirtyTracking;
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
    public MigrationStrategy Strategy { get; init; } = MigrationStrategy.PreCopy;
    /// <summary>Post-copy and hybrid settings (PostCopyOptions.cs).</summary>
    public PostCopyOptions PostCopy { get; init; } = new();
}

/// <summary>Destination-side settings.</summary>
public sealed record DestinationOptions
{
    /// <summary>Largest VM memory the destination accepts (default: the machine's memory).</summary>
    public long MaxMemoryBytes { get; init; } = MachineMemory.TotalBytes;
    public DirtyLogKind DirtyLog { get; init; } = DirtyLogKind.Auto;
    public TimeSpan IoTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>TLS and authentication required of sources (default: plain TCP).</summary>
    public Transport.ChannelSecurity Security { get; init; } = Transport.ChannelSecurity.None;
    /// <summary>Also rehash all of memory from scratch before resuming and compare (slow: a full pass in the downtime; for tests and audits).</summary>
    public bool VerifyFromScratch { get; init; }
    /// <summary>Called with the VM just before it resumes, e.g. to move its network endpoint to it.</summary>
    public Action<BuiltInVm>? BeforeResume { get; init; }
    /// <summary>Post-copy settings (PostCopyOptions.cs).</summary>
    public PostCopyDestinationOptions PostCopy { get; init; } = new();
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
