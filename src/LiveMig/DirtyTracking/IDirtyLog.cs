using LiveMig.Memory;

namespace LiveMig.DirtyTracking;

/// <summary>
/// Which guest pages were written since the last harvest. The engine starts it before round 0
/// reads any page, so every write after that point is seen by some later harvest.
/// </summary>
public interface IDirtyLog : IDisposable
{
    /// <summary>Short name for reports: <c>software</c> or <c>uffd-wp</c>.</summary>
    string Name { get; }

    bool IsTracking { get; }

    /// <summary>Begins tracking; every page starts clean.</summary>
    void Start();

    /// <summary>ORs the pages written since the last harvest into <paramref name="into"/>, clears them, returns how many.</summary>
    long Harvest(PageBitmap into);

    /// <summary>
    /// As <see cref="Harvest"/>, but only what must be known of <paramref name="ranges"/> (page
    /// ranges, ascending): the pages written there are ORed into <paramref name="into"/>. Pages
    /// outside may be reported too (the default harvests everything: a superset, only slower), and
    /// may stay unreported until a later harvest. Post-copy's pause asks only about the pages that
    /// were holes when it scanned the populated ones.
    /// </summary>
    long HarvestWithin(IReadOnlyList<(long First, long Count)> ranges, PageBitmap into) => Harvest(into);

    void Stop();

    /// <summary>True when <see cref="WrittenSinceHarvest"/> can answer cheaply (a memory read, no system call).</summary>
    bool CanPeek => false;

    /// <summary>Was the page written since the last harvest? Only meaningful when <see cref="CanPeek"/>; does not clear anything.</summary>
    bool WrittenSinceHarvest(long page) => false;

    /// <summary>
    /// True for a log that finds changed pages by content rather than by watching writes
    /// (<see cref="PageHashDirtyLog"/>, for memory another process writes): the engine then keeps
    /// per-page hashes of the pages as it sent them and hands them over with <see cref="CompareWithSent"/>.
    /// </summary>
    bool NeedsSentHashes => false;

    /// <summary>The engine's per-page hashes of the pages as sent (what the destination holds), kept current by the engine; given after <see cref="Start"/>, before round 0.</summary>
    void CompareWithSent(PageHashes sent) { }
}

public enum DirtyLogKind
{
    /// <summary>Kernel tracking where available (userfaultfd async write-protect + PAGEMAP_SCAN), else software.</summary>
    Auto,
    Software,
    Kernel,
}

public static class DirtyLogFactory
{
    /// <summary>
    /// Makes the dirty log for <paramref name="memory"/>. <c>Auto</c> falls back to the software
    /// log when the kernel lacks the mechanism, and says why in <paramref name="note"/>.
    /// </summary>
    public static IDirtyLog Create(GuestMemory memory, DirtyLogKind kind, out string? note)
    {
        note = null;
        if (kind == DirtyLogKind.Software) return new SoftwareDirtyLog(memory);
        if (UffdWriteProtectDirtyLog.TryCreate(memory, out var log, out string? why)) return log!;
        if (kind == DirtyLogKind.Kernel)
            throw new NotSupportedException($"kernel dirty tracking unavailable: {why}");
        note = $"kernel dirty tracking unavailable ({why}); using the software dirty log";
        return new SoftwareDirtyLog(memory);
    }
}
