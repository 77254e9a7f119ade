using System.Buffers.Binary;
using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// An open-addressing (linear probing) hash table laid out in guest memory, so that it migrates
/// with the pages. Page <see cref="FirstPage"/> is the header; the slots follow, packed per page
/// so that no slot straddles two pages (one NoteWrite per slot write). There is no delete, so a
/// probe stops at the first never-used slot and needs no tombstones. This type holds only the
/// geometry (derived from the workload parameters); every piece of state is in memory.
/// Callers serialise access (the workload's table lock).
/// </summary>
internal sealed unsafe class KvTable
{
    public const int SlotHeaderSize = 16;
    private const ulong Magic = 0x3142_4154_564B_4D4C; // "LMKVTAB1"
    private const uint Format = 1;

    // Header fields (offsets in the header page).
    private const int HMagic = 0, HFormat = 8, HValueSize = 12, HCapacity = 16, HSlotCount = 24,
        HSlotSize = 32, HSlotsPerPage = 36, HTableId = 40, HCount = 48;

    // Slot fields: key u64, value length u16, used u8, 5 bytes zero, then the value.
    private const int SKey = 0, SLength = 8, SUsed = 10;

    public KvTable(long firstPage, long capacity, int valueSize)
    {
        FirstPage = firstPage;
        Capacity = capacity;
        ValueSize = valueSize;
        SlotSize = SlotSizeFor(valueSize);
        SlotsPerPage = GuestMemory.PageSize / SlotSize;
        SlotCount = SlotCountFor(capacity);
        SlotPages = (SlotCount + SlotsPerPage - 1) / SlotsPerPage;
    }

    public long FirstPage { get; }
    public long Capacity { get; }
    public int ValueSize { get; }
    public int SlotSize { get; }
    public int SlotsPerPage { get; }
    public long SlotCount { get; }
    public long SlotPages { get; }
    public long TablePages => 1 + SlotPages;

    private static int SlotSizeFor(int valueSize) => (SlotHeaderSize + valueSize + 7) & ~7;

    /// <summary>Load factor at most 3/4 keeps linear probes short; +1 guarantees an empty slot ends every probe.</summary>
    private static long SlotCountFor(long capacity) => capacity + capacity / 3 + 1;

    public static long PagesFor(long capacity, int valueSize)
    {
        long perPage = GuestMemory.PageSize / SlotSizeFor(valueSize);
        return 1 + (SlotCountFor(capacity) + perPage - 1) / perPage;
    }

    /// <summary>The most keys whose table fits in <paramref name="pages"/> pages (0 if none).</summary>
    public static long MaxCapacityFor(long pages, int valueSize)
    {
        long perPage = GuestMemory.PageSize / SlotSizeFor(valueSize);
        long slots = (pages - 1) * perPage;
        if (slots < 2) return 0;
        long cap = (slots - 1) * 3 / 4;
        while (cap > 0 && PagesFor(cap, valueSize) > pages) cap--;
        return cap;
    }

    private byte* Header(GuestMemory m) => m.GuestPointer(FirstPage);

    private byte* Slot(GuestMemory m, long index, out long page)
    {
        page = FirstPage + 1 + index / SlotsPerPage;
        return m.GuestPointer(page) + (int)(index % SlotsPerPage) * SlotSize;
    }

    /// <summary>A fixed mixer (murmur3 fmix64): the placement must be the same in every process, so no randomised hashing.</summary>
    private static ulong Mix(ulong k)
    {
        k ^= k >> 33; k *= 0xff51afd7ed558ccdUL;
        k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53UL;
        return k ^ (k >> 33);
    }

    private long Home(ulong key) => (long)Math.BigMul(Mix(key), (ulong)SlotCount, out _);

    /// <summary>True when the header describes exactly this table.</summary>
    public bool HeaderValid(GuestMemory m, out ulong tableId)
    {
        var h = new ReadOnlySpan<byte>(Header(m), GuestMemory.PageSize);
        tableId = BinaryPrimitives.ReadUInt64LittleEndian(h[HTableId..]);
        return BinaryPrimitives.ReadUInt64LittleEndian(h[HMagic..]) == Magic
            && BinaryPrimitives.ReadUInt32LittleEndian(h[HFormat..]) == Format
            && BinaryPrimitives.ReadUInt32LittleEndian(h[HValueSize..]) == (uint)ValueSize
            && BinaryPrimitives.ReadInt64LittleEndian(h[HCapacity..]) == Capacity
            && BinaryPrimitives.ReadInt64LittleEndian(h[HSlotCount..]) == SlotCount
            && BinaryPrimitives.ReadUInt32LittleEndian(h[HSlotSize..]) == (uint)SlotSize
            && BinaryPrimitives.ReadUInt32LittleEndian(h[HSlotsPerPage..]) == (uint)SlotsPerPage
            && (ulong)ReadCount(m) <= (ulong)Capacity;
    }

    public long ReadCount(GuestMemory m) => *(long*)(Header(m) + HCount);

    /// <summary>
    /// Makes an empty table: clears the pages of the region that hold data (the initial memory
    /// fill may have put bytes there; holes already read as zero and stay holes), then writes the header.
    /// </summary>
    public void Initialise(GuestMemory m, ulong tableId)
    {
        long end = FirstPage + TablePages;
        foreach (var (first, count) in m.DataExtents())
        {
            for (long p = Math.Max(first, FirstPage), e = Math.Min(first + count, end); p < e; p++)
            {
                m.Page(p).Clear();
                m.NoteWrite(p);
            }
        }
        var h = m.Page(FirstPage);
        h.Clear();
        BinaryPrimitives.WriteUInt32LittleEndian(h[HFormat..], Format);
        BinaryPrimitives.WriteUInt32LittleEndian(h[HValueSize..], (uint)ValueSize);
        BinaryPrimitives.WriteInt64LittleEndian(h[HCapacity..], Capacity);
        BinaryPrimitives.WriteInt64LittleEndian(h[HSlotCount..], SlotCount);
        BinaryPrimitives.WriteUInt32LittleEndian(h[HSlotSize..], (uint)SlotSize);
        BinaryPrimitives.WriteUInt32LittleEndian(h[HSlotsPerPage..], (uint)SlotsPerPage);
        BinaryPrimitives.WriteUInt64LittleEndian(h[HTableId..], tableId);
        BinaryPrimitives.WriteInt64LittleEndian(h[HCount..], 0);
        BinaryPrimitives.WriteUInt64LittleEndian(h[HMagic..], Magic); // last: a header with magic is complete
        m.NoteWrite(FirstPage);
    }

    /// <summary>
    /// Probes for <paramref name="key"/>: true and its slot, or false and the empty slot where it
    /// would go (-1 when a damaged table has no empty slot on the probe path).
    /// </summary>
    private bool Find(GuestMemory m, ulong key, out long index)
    {
        long i = Home(key);
        for (long n = 0; n < SlotCount; n++)
        {
            byte* s = Slot(m, i, out _);
            if (s[SUsed] == 0) { index = i; return false; }
            if (*(ulong*)(s + SKey) == key) { index = i; return true; }
            if (++i == SlotCount) i = 0;
        }
        index = -1;
        return false;
    }

    public KvStatus Get(GuestMemory m, ulong key, Span<byte> into, out int length)
    {
        length = 0;
        if (!Find(m, key, out long i)) return KvStatus.NotFound;
        byte* s = Slot(m, i, out _);
        // Clamp: a damaged length must not read past the slot.
        length = Math.Min(*(ushort*)(s + SLength), ValueSize);
        new ReadOnlySpan<byte>(s + SlotHeaderSize, length).CopyTo(into);
        return KvStatus.Ok;
    }

    public KvStatus Put(GuestMemory m, ulong key, ReadOnlySpan<byte> value)
    {
        if (value.Length > ValueSize) return KvStatus.TooLarge;
        bool found = Find(m, key, out long i);
        if (!found && (i < 0 || ReadCount(m) >= Capacity)) return KvStatus.Full;
        byte* s = Slot(m, i, out long page);
        value.CopyTo(new Span<byte>(s + SlotHeaderSize, value.Length));
        *(ushort*)(s + SLength) = (ushort)value.Length;
        if (!found)
        {
            *(ulong*)(s + SKey) = key;
            s[SUsed] = 1;
        }
        m.NoteWrite(page);
        if (!found)
        {
            *(long*)(Header(m) + HCount) += 1;
            m.NoteWrite(FirstPage);
        }
        return KvStatus.Ok;
    }

    /// <summary>
    /// Walks the slots: every used slot well-formed and the one its key's probe finds (so no key
    /// is lost or duplicated), the count in the header equal to the used slots. Pages that are
    /// holes hold only empty slots and are skipped rather than read (reading would allocate them).
    /// </summary>
    public string? Check(GuestMemory m)
    {
        if (!HeaderValid(m, out _)) return $"kv table header at page {FirstPage} is missing or does not match the workload's parameters";
        long used = 0;
        long firstSlotPage = FirstPage + 1, end = firstSlotPage + SlotPages;
        foreach (var (first, count) in m.DataExtents())
        {
            for (long p = Math.Max(first, firstSlotPage), e = Math.Min(first + count, end); p < e; p++)
            {
                long firstIndex = (p - firstSlotPage) * SlotsPerPage;
                for (long i = firstIndex; i < firstIndex + SlotsPerPage && i < SlotCount; i++)
                {
                    byte* s = Slot(m, i, out _);
                    ulong key = *(ulong*)(s + SKey);
                    int length = *(ushort*)(s + SLength);
                    byte flag = s[SUsed];
                    if (flag == 0)
                    {
                        if (key != 0 || length != 0) return $"kv slot {i} is empty but holds key {key} length {length}";
                        continue;
                    }
                    if (flag != 1) return $"kv slot {i} has used flag {flag}";
                    if (length > ValueSize) return $"kv slot {i} (key {key}) has length {length} > value size {ValueSize}";
                    if (!Find(m, key, out long at) || at != i) return $"kv key {key} in slot {i} is not found there by lookup (lookup gives {at})";
                    used++;
                }
            }
        }
        long header = ReadCount(m);
        return used == header ? null : $"kv header count {header} but {used} slots are used";
    }
}
