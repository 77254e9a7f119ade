using System.Runtime.CompilerServices;
using LiveMig.Memory;
using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>
/// XBZRLE-style delta of a page against an older copy of it (after QEMU's xbzrle, our own
/// format). The XOR of new and old is cut into runs: unchanged (zero XOR) and changed bytes.
/// The payload is a sequence of records
/// <code>
/// record: varint skip | varint length (≥ 1) | length bytes of new content
/// </code>
/// applied from offset 0: advance <c>skip</c> unchanged bytes, then copy <c>length</c> new
/// bytes. The unchanged tail of the page is not written. Varints are LEB128 (7 bits a byte, at
/// most 2 bytes: values ≤ 4096). Unchanged gaps shorter than <see cref="MinGap"/> inside a
/// changed stretch are carried as literals, since a new record would cost more. An empty
/// payload means "unchanged".
/// </summary>
public static class XbzrleDelta
{
    /// <summary>A gap of unchanged bytes is worth a new record only from this length.</summary>
    public const int MinGap = 4;

    /// <summary>
    /// Encodes <paramref name="current"/> as a delta against <paramref name="old"/> into
    /// <paramref name="destination"/>; returns the payload length, or -1 when the delta does not
    /// fit in <paramref name="destination"/> (an overflow: the page changed too much).
    /// </summary>
    public static int Encode(ReadOnlySpan<byte> current, ReadOnlySpan<byte> old, Span<byte> destination)
    {
        int n = current.Length;
        if (old.Length != n) throw new ArgumentException("old and current differ in length");
        int at = 0, i = 0;
        int budget = destination.Length;
        while (i < n)
        {
            // Next changed byte (vectorised compare).
            int d = i + current[i..].CommonPrefixLength(old[i..]);
            if (d >= n) break;
            // End of the changed stretch: the first unchanged gap of at least MinGap bytes (or the page end).
            int end = d + 1;
            while (true)
            {
                while (end < n && current[end] != old[end]) end++;
                if (end >= n) break;
                int gap = current[end..].CommonPrefixLength(old[end..]);
                if (gap >= MinGap || end + gap >= n) break;
                end += gap;
            }
            int skip = d - i, length = end - d;
            int need = VarintSize(skip) + VarintSize(length) + length;
            if (need > budget - at) return -1;
            at += WriteVarint(destination[at..], skip);
            at += WriteVarint(destination[at..], length);
            current.Slice(d, length).CopyTo(destination[at..]);
            at += length;
            i = end;
        }
        return at;
    }

    /// <summary>Applies a delta to <paramref name="target"/> (which holds the old page) in place. Throws <see cref="ProtocolException"/> on a corrupt delta.</summary>
    public static void Apply(long page, ReadOnlySpan<byte> delta, Span<byte> target)
    {
        // Checked in full before the first byte of the page changes: a corrupt delta leaves the page as it was.
        Walk(page, delta, target.Length, default);
        Walk(page, delta, target.Length, target);
    }

    private static void Walk(long page, ReadOnlySpan<byte> delta, int pageLength, Span<byte> target)
    {
        int at = 0, pos = 0, record = 0;
        bool write = !target.IsEmpty;
        while (at < delta.Length)
        {
            int skip = ReadVarint(page, delta, ref at, record, "skip");
            int length = ReadVarint(page, delta, ref at, record, "length");
            if (length == 0) throw new ProtocolException($"XBZRLE delta for page {page}: record {record} has length 0");
            if (skip > pageLength - pos || length > pageLength - pos - skip)
                throw new ProtocolException($"XBZRLE delta for page {page}: record {record} (skip {skip}, length {length} at offset {pos}) runs past the page end");
            if (length > delta.Length - at)
                throw new ProtocolException($"XBZRLE delta for page {page}: record {record} needs {length} literal bytes, {delta.Length - at} left");
            pos += skip;
            if (write) delta.Slice(at, length).CopyTo(target[pos..]);
            pos += length;
            at += length;
            record++;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int VarintSize(int v) => v < 0x80 ? 1 : 2;

    private static int WriteVarint(Span<byte> into, int v)
    {
        if (v < 0x80) { into[0] = (byte)v; return 1; }
        into[0] = (byte)(v | 0x80);
        into[1] = (byte)(v >> 7);
        return 2;
    }

    private static int ReadVarint(long page, ReadOnlySpan<byte> delta, ref int at, int record, string what)
    {
        if (at >= delta.Length) throw new ProtocolException($"XBZRLE delta for page {page}: record {record} is cut off before its {what}");
        int b0 = delta[at++];
        if (b0 < 0x80) return b0;
        if (at >= delta.Length) throw new ProtocolException($"XBZRLE delta for page {page}: record {record} is cut off inside its {what}");
        int b1 = delta[at++];
        if (b1 >= 0x80) throw new ProtocolException($"XBZRLE delta for page {page}: record {record} has a {what} varint longer than 2 bytes");
        int v = (b0 & 0x7F) | (b1 << 7);
        if (v > GuestMemory.PageSize) throw new ProtocolException($"XBZRLE delta for page {page}: record {record} has {what} {v}, more than a page");
        return v;
    }
}

/// <summary>
/// The source's bounded cache of pages as last sent (the base of the next delta), least
/// recently used evicted first. Invariant: an entry for page p holds exactly what the
/// destination holds for p, so every send of p, whatever its encoding, must update or drop it
/// (<see cref="Update"/>). Sharded by page number, each shard with its own lock, so encoders on
/// several threads rarely contend.
/// </summary>
public sealed class XbzrleCache
{
    private readonly Shard[] _shards;
    private readonly int _shardMask;

    public XbzrleCache(long bytes)
    {
        long pages = Math.Max(1, bytes / GuestMemory.PageSize);
        int shards = 1;
        while (shards < 16 && pages / (shards * 2) >= 64) shards *= 2;
        _shards = new Shard[shards];
        _shardMask = shards - 1;
        for (int i = 0; i < shards; i++) _shards[i] = new Shard((int)Math.Min(int.MaxValue / GuestMemory.PageSize, pages / shards + (i < pages % shards ? 1 : 0)));
        CapacityPages = _shards.Sum(s => (long)s.Capacity);
    }

    public long CapacityPages { get; }

    /// <summary>
    /// No page was ever inserted (round 0 inserts none): there is nothing to refresh, so an
    /// encoder need not lock a shard to learn that. Each page is encoded by one thread only, so
    /// the flag it reads was set by that thread's own earlier insert if that page has an entry.
    /// </summary>
    public bool IsEmpty => !Volatile.Read(ref _inserted);
    private bool _inserted;

    public long Count => _shards.Sum(s => (long)s.Count);

    private Shard For(long page) => _shards[(int)((ulong)page * 0x9E3779B97F4A7C15UL >> 40) & _shardMask];

    /// <summary>
    /// Encodes <paramref name="current"/> as a delta against the cached copy of the page, if
    /// there is one, and makes the cache hold <paramref name="current"/> when the delta is used.
    /// Returns the delta's length, -1 when the page is not cached (miss), -2 when the delta did
    /// not fit (overflow; the entry is left for <see cref="Update"/>).
    /// </summary>
    public int TryEncode(long page, ReadOnlySpan<byte> current, Span<byte> destination)
    {
        var s = For(page);
        lock (s)
        {
            if (!s.TryGet(page, out int slot)) return -1;
            Span<byte> old = s.Data(slot);
            int n = XbzrleDelta.Encode(current, old, destination);
            if (n < 0) return -2;
            current.CopyTo(old);
            s.Touch(slot);
            return n;
        }
    }

    /// <summary>The page was sent with <paramref name="content"/> by another encoding: refresh its entry if any, or add one when <paramref name="insert"/>.</summary>
    public void Update(long page, ReadOnlySpan<byte> content, bool insert)
    {
        var s = For(page);
        lock (s)
        {
            if (s.TryGet(page, out int slot)) { content.CopyTo(s.Data(slot)); s.Touch(slot); }
            else if (insert)
            {
                Volatile.Write(ref _inserted, true);
                content.CopyTo(s.Data(s.Insert(page)));
            }
        }
    }

    /// <summary>Drops the page's entry, if any (its slot is the next one reused).</summary>
    public void Remove(long page)
    {
        var s = For(page);
        lock (s) s.Remove(page);
    }

    public bool Contains(long page)
    {
        var s = For(page);
        lock (s) return s.TryGet(page, out _);
    }

    /// <summary>One shard: slots in one array, an index page → slot, and an LRU list through the slots.</summary>
    private sealed class Shard(int capacity)
    {
        public readonly int Capacity = Math.Max(1, capacity);
        private readonly Dictionary<long, int> _index = [];
        private byte[]? _data;
        private long[]? _pageOf;
        private int[]? _prev, _next;
        private int _head = -1, _tail = -1; // head = most recent
        private int _used;

        public int Count => _index.Count;

        public bool TryGet(long page, out int slot) => _index.TryGetValue(page, out slot);

        public Span<byte> Data(int slot) => _data.AsSpan(slot * GuestMemory.PageSize, GuestMemory.PageSize);

        public void Touch(int slot)
        {
            if (_head == slot) return;
            Unlink(slot);
            PushFront(slot);
        }

        public int Insert(long page)
        {
            if (_data is null)
            {
                _data = GC.AllocateUninitializedArray<byte>(Capacity * GuestMemory.PageSize);
                _pageOf = new long[Capacity];
                _prev = new int[Capacity];
                _next = new int[Capacity];
            }
            int slot;
            if (_used < Capacity) slot = _used++;
            else
            {
                slot = _tail;
                Unlink(slot);
                _index.Remove(_pageOf![slot]);
            }
            _pageOf![slot] = page;
            _index[page] = slot;
            PushFront(slot);
            return slot;
        }

        public void Remove(long page)
        {
            if (!_index.Remove(page, out int slot)) return;
            // To the LRU tail with no owner: Insert evicts from the tail, so it is reused first.
            _pageOf![slot] = -1;
            Unlink(slot);
            _prev![slot] = _tail;
            _next![slot] = -1;
            if (_tail >= 0) _next[_tail] = slot; else _head = slot;
            _tail = slot;
        }

        private void Unlink(int slot)
        {
            int p = _prev![slot], n = _next![slot];
            if (p >= 0) _next[p] = n; else _head = n;
            if (n >= 0) _prev[n] = p; else _tail = p;
        }

        private void PushFront(int slot)
        {
            _prev![slot] = -1;
            _next![slot] = _head;
            if (_head >= 0) _prev[_head] = slot;
            _head = slot;
            if (_tail < 0) _tail = slot;
        }
    }
}
