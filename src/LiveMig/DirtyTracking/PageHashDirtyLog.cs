using System.IO.Hashing;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.DirtyTracking;

/// <summary>
/// The dirty log that needs nothing from the kernel or the writer: each harvest hashes every
/// page of the memory (xxHash3-64; holes hash as the zero page without being touched) and
/// reports those whose content differs from what the engine last sent of them
/// (<see cref="IDirtyLog.CompareWithSent"/>: the destination holds exactly that). It sees writes
/// made by another process through its own mapping — a QEMU guest's RAM file — which neither
/// the software log nor userfaultfd write-protect (one mapping, in the registering process) can.
/// Comparing with what was sent, not with the previous harvest, keeps it exact: a page that
/// changed after the engine read it and changed back before the harvest is reported, and a
/// page written back to the content the destination holds is not (nothing to send).
/// Costs a pass over the memory per harvest (about 10 ms per 128 MiB here, in parallel).
/// Without the sent hashes (used outside the engine) it compares with the previous harvest.
/// </summary>
public sealed class PageHashDirtyLog(GuestMemory memory, Func<string?>? failure = null) : IDirtyLog
{
    private const int ChunkPages = 512;
    private readonly ulong[] _current = new ulong[memory.PageCount];
    private ulong[]? _previous;
    private PageHashes? _sent;

    public string Name => "page-hash";
    public bool IsTracking { get; private set; }
    public bool NeedsSentHashes => true;

    public void Start()
    {
        _sent = null;
        _previous = new ulong[memory.PageCount];
        Hash(_previous);
        IsTracking = true;
    }

    public void CompareWithSent(PageHashes sent) => _sent = sent;

    public long Harvest(PageBitmap into)
    {
        if (!IsTracking) return 0;
        // Memory another process writes: when that process has died, there is nothing left to track.
        if (failure?.Invoke() is { } dead) throw new VmFailedException(dead);
        Hash(_current);
        ReadOnlySpan<ulong> baseline = _sent is { } s ? s.Values : _previous;
        long n = 0;
        for (long p = 0; p < _current.Length; p++)
        {
            if (_current[p] == baseline[(int)p]) continue;
            into.Set(p);
            n++;
        }
        if (_sent is null) _current.AsSpan().CopyTo(_previous);
        return n;
    }

    /// <summary>Every page's hash into <paramref name="into"/>: populated extents read in parallel chunks, holes as the zero page.</summary>
    private unsafe void Hash(ulong[] into)
    {
        Array.Fill(into, PageHashes.ZeroPageHash);
        var pieces = new List<(long First, long Count)>();
        foreach (var (first, count) in memory.DataExtents())
            for (long p = first; p < first + count; p += ChunkPages) pieces.Add((p, Math.Min(ChunkPages, first + count - p)));
        Parallel.ForEach(pieces, piece =>
        {
            for (long p = piece.First; p < piece.First + piece.Count; p++)
                into[p] = XxHash3.HashToUInt64(new ReadOnlySpan<byte>(memory.PagePointer(p), GuestMemory.PageSize));
        });
    }

    public void Stop() => IsTracking = false;

    public void Dispose() => Stop();
}
