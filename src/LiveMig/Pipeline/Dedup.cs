using System.Buffers.Binary;
using System.IO.Hashing;
using System.Runtime.CompilerServices;
using LiveMig.Memory;
using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>Content hashes for deduplication: xxHash3-128 of a page.</summary>
public static class ContentHash
{
    public const int Size = 16;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static UInt128 Of(ReadOnlySpan<byte> page) => XxHash128.HashToUInt128(page);

    public static void Write(UInt128 h, Span<byte> into) => BinaryPrimitives.WriteUInt128LittleEndian(into, h);

    public static UInt128 Read(ReadOnlySpan<byte> from) => BinaryPrimitives.ReadUInt128LittleEndian(from);
}

/// <summary>
/// The source's model of what the destination holds, for dedup references: for each page the
/// hash of the content last sent for it, and for each content hash one page that holds it now.
/// A reference is only ever made to a page whose last-sent content has that hash, so it is
/// valid when the destination applies it (pages are applied in the order they are sent). When a
/// page is re-sent with other content its old hash loses that holder (the entry is dropped even
/// if other pages still hold the content: simple and safe; the content is re-registered the next
/// time it is sent in full). Thread-safe: sharded by hash, one lock per shard.
/// With several data streams each stream has its own holders (a reference names only a holder
/// carried by the same stream, which the destination has placed, in order, before the
/// reference: another stream's holder might not have arrived yet, or be overwritten by a
/// version still in flight). The per-page record is shared: a page belongs to one stream.
/// </summary>
public sealed class DedupSourceIndex
{
    private const int Shards = 16;
    private readonly Dictionary<UInt128, uint>[] _holders;
    private readonly UInt128[] _sent;
    private readonly int _streams;

    /// <summary>A page whose content the destination does not hold by this index (never sent, or zero).</summary>
    public static readonly UInt128 None = UInt128.Zero;

    public DedupSourceIndex(long pageCount, int streams = 1)
    {
        _sent = new UInt128[checked((int)pageCount)];
        _streams = Math.Max(1, streams);
        _holders = new Dictionary<UInt128, uint>[Shards * _streams];
        for (int i = 0; i < _holders.Length; i++) _holders[i] = [];
    }

    private Dictionary<UInt128, uint> ShardOf(UInt128 h, int stream) => _holders[stream * Shards + (int)((ulong)h & (Shards - 1))];

    private int StreamOf(long page) => _streams == 1 ? 0 : Protocol.StreamLayout.StreamOf(page, _streams);

    /// <summary>A page that holds content <paramref name="h"/> at the destination and travels on the same stream as <paramref name="forPage"/>, or -1.</summary>
    public long Holder(UInt128 h, long forPage = 0)
    {
        if (h == None) return -1;
        var d = ShardOf(h, StreamOf(forPage));
        lock (d) return d.TryGetValue(h, out uint p) ? p : -1;
    }

    /// <summary>Page <paramref name="page"/> now holds content <paramref name="h"/> at the destination (<see cref="None"/> for zero or unknown).</summary>
    public void Sent(long page, UInt128 h)
    {
        UInt128 old = _sent[page];
        if (old == h) return;
        if (old != None)
        {
            var d = ShardOf(old, StreamOf(page));
            lock (d) { if (d.TryGetValue(old, out uint p) && p == page) d.Remove(old); }
        }
        _sent[page] = h;
        if (h != None)
        {
            var d = ShardOf(h, StreamOf(page));
            lock (d) d.TryAdd(h, (uint)page);
        }
    }

    public UInt128 SentHash(long page) => _sent[page];
}

/// <summary>
/// A destination-wide index from content hash to a page some incoming migration placed (its
/// guest memory and page number), shared by every migration of one destination (gang
/// migration: VMs that share content send it once). Entries are hints, never trusted: a
/// candidate is copied, then hashed again, and used only if the copy has the hash, so a page
/// overwritten since (its VM runs, or it was re-sent) never puts wrong content into memory; a
/// stale entry is dropped. (Hashes are compared, not bytes: a true xxHash3-128 collision would
/// pass, and is left to the migration's verification hash.) Memory that was disposed is skipped
/// (<see cref="GuestMemory.TryCopyPage"/>). Thread-safe: striped by hash, one lock per stripe.
/// </summary>
public sealed class DedupStore
{
    // Striped by hash: every placed page of every incoming migration (and every stream) adds an
    // entry, so one lock for all would serialise their placers.
    private const int Shards = 32;
    private readonly Shard[] _shards = Enumerable.Range(0, Shards).Select(_ => new Shard()).ToArray();

    private sealed class Shard
    {
        public readonly Dictionary<UInt128, (GuestMemory Memory, long Page)> Index = [];
    }

    /// <summary>Most entries kept (about 48 bytes each); past it new content is not indexed until stale entries are purged.</summary>
    public int MaxEntries { get; init; } = 4 << 20;

    public int Count
    {
        get
        {
            int n = 0;
            foreach (var s in _shards) lock (s) n += s.Index.Count;
            return n;
        }
    }

    private Shard ShardOf(UInt128 h) => _shards[(int)((ulong)h % Shards)];

    /// <summary>Records that <paramref name="page"/> of <paramref name="memory"/> holds content <paramref name="h"/>.</summary>
    public void Add(UInt128 h, GuestMemory memory, long page)
    {
        var s = ShardOf(h);
        int perShard = Math.Max(1, MaxEntries / Shards);
        lock (s)
        {
            if (s.Index.Count >= perShard && !s.Index.ContainsKey(h))
            {
                PurgeDisposed(s);
                if (s.Index.Count >= perShard) return;
            }
            s.Index[h] = (memory, page);
        }
    }

    /// <summary>
    /// Indexes the placed, non-zero pages (<paramref name="placed"/>) of a VM that arrived, after
    /// it resumed: what its decoders deferred (<see cref="PipelineDecoder.IndexPlacedPages"/>) so
    /// that hashing every page for later gang migrations is not part of this migration's time.
    /// The VM runs meanwhile: a page it rewrites is indexed with whatever it holds then — a hint,
    /// like every entry, checked when used. Returns the pages indexed.
    /// </summary>
    public long AddArrived(GuestMemory memory, PageBitmap placed)
    {
        long n = 0;
        for (long p = placed.NextSet(0); p >= 0; p = placed.NextSet(p + 1))
        {
            ReadOnlySpan<byte> page = memory.Page(p);
            if (PageCodec.IsZero(page)) continue;
            Add(ContentHash.Of(page), memory, p);
            n++;
        }
        return n;
    }

    /// <summary>
    /// Fills <paramref name="target"/> with content of hash <paramref name="h"/> from any memory
    /// indexed here; true when the copy was made and verified. On false, <paramref name="touched"/>
    /// says whether <paramref name="target"/> was written (it then holds garbage: the caller restores it).
    /// </summary>
    public bool TryFill(UInt128 h, Span<byte> target, out bool touched)
    {
        (GuestMemory Memory, long Page) e;
        touched = false;
        var s = ShardOf(h);
        lock (s) { if (!s.Index.TryGetValue(h, out e)) return false; }
        touched = e.Memory.TryCopyPage(e.Page, target);
        if (touched && ContentHash.Of(target) == h) return true;
        lock (s)
        {
            // Stale (overwritten, or its memory is gone): forget it unless someone re-registered meanwhile.
            if (s.Index.TryGetValue(h, out var now) && now == e) s.Index.Remove(h);
        }
        return false;
    }

    private static void PurgeDisposed(Shard s)
    {
        foreach (var (h, e) in s.Index.ToArray())
            if (e.Memory.IsDisposed) s.Index.Remove(h);
    }
}

/// <summary>
/// Source → destination before round 0 when Dedup is negotiated: pages the source is about to
/// send, with their content hashes. The destination fills every page whose content it already
/// holds (from any VM: <see cref="DedupStore"/>) and answers with a bitmap.
/// <code>u32 count | count × (u32 page | 16-byte xxHash3-128)</code>
/// </summary>
public static class DedupQuery
{
    public const int EntrySize = 4 + ContentHash.Size;
    /// <summary>Entries per query frame (20 bytes each: 640 KiB, inside the 1 MiB frame limit).</summary>
    public const int MaxEntries = 32768;

    public static int Write(Span<byte> into, ReadOnlySpan<(uint Page, UInt128 Hash)> entries)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(into, (uint)entries.Length);
        int at = 4;
        foreach (var (page, hash) in entries)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(into[at..], page);
            ContentHash.Write(hash, into[(at + 4)..]);
            at += EntrySize;
        }
        return at;
    }

    /// <summary>Checks the layout; returns the entry count.</summary>
    public static int Count(ReadOnlySpan<byte> payload)
    {
        if (payload.Length < 4) throw new ProtocolException($"DedupQuery: {payload.Length} bytes is shorter than its header");
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(payload);
        if (count > MaxEntries) throw new ProtocolException($"DedupQuery: {count} entries, more than {MaxEntries}");
        if (payload.Length != 4 + (long)count * EntrySize) throw new ProtocolException($"DedupQuery: {payload.Length} bytes for {count} entries (expected {4 + (long)count * EntrySize})");
        return (int)count;
    }

    public static (uint Page, UInt128 Hash) Entry(ReadOnlySpan<byte> payload, int i)
    {
        var e = payload.Slice(4 + i * EntrySize, EntrySize);
        return (BinaryPrimitives.ReadUInt32LittleEndian(e), ContentHash.Read(e[4..]));
    }
}

/// <summary>Destination → source: <c>u32 count | ceil(count/8) bytes bitmap</c>; bit i set = the destination filled entry i's page.</summary>
public static class DedupAnswer
{
    public static int Write(Span<byte> into, ReadOnlySpan<bool> filled)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(into, (uint)filled.Length);
        Span<byte> bits = into.Slice(4, (filled.Length + 7) / 8);
        bits.Clear();
        for (int i = 0; i < filled.Length; i++) if (filled[i]) bits[i >> 3] |= (byte)(1 << (i & 7));
        return 4 + bits.Length;
    }

    public static bool[] Parse(ReadOnlySpan<byte> payload, int expected)
    {
        if (payload.Length < 4) throw new ProtocolException("DedupAnswer: shorter than its header");
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(payload);
        if (count != expected) throw new ProtocolException($"DedupAnswer: {count} entries for a query of {expected}");
        if (payload.Length != 4 + (expected + 7) / 8) throw new ProtocolException($"DedupAnswer: {payload.Length} bytes for {expected} entries");
        var r = new bool[expected];
        for (int i = 0; i < expected; i++) r[i] = (payload[4 + (i >> 3)] & (1 << (i & 7))) != 0;
        return r;
    }
}
