using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LiveMig.Memory;

/// <summary>
/// One bit per guest page. <see cref="Set"/> is lock-free and safe from any number of
/// writers; <see cref="HarvestInto"/> reads and clears in one pass over 64-bit words, so a
/// write racing the harvest lands either in this harvest or the next, never in neither.
/// A <see cref="Compact"/> bitmap (the simulator's) holds no words while it is all clear or all
/// set — the common state of a migration's page sets with little or no dirtying — and gets them
/// on the first operation that needs them; it may drop them again when it becomes uniform, so
/// only single-threaded code that keeps no <c>Words</c> reference across calls may use one.
/// </summary>
public sealed class PageBitmap
{
    private ulong[]? _words;
    private ulong[]? _spare; // a compact bitmap's words from before it became uniform: reused, not reallocated, when it needs words again
    private bool _uniformSet; // with no words: every page set (else every page clear)
    private readonly bool _compact;

    public PageBitmap(long pageCount) : this(pageCount, compact: false) { }

    private PageBitmap(long pageCount, bool compact)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pageCount);
        PageCount = pageCount;
        WordCount = (pageCount + 63) / 64;
        _compact = compact;
        if (!compact) _words = new ulong[WordCount];
    }

    /// <summary>
    /// An all-clear bitmap that allocates its words only when its pages stop being all alike (10,000
    /// simulated 2 GiB migrations at once would otherwise hold 64 KiB per page set each). Single-threaded.
    /// </summary>
    public static PageBitmap Compact(long pageCount) => new(pageCount, compact: true);

    public long PageCount { get; }

    /// <summary>The words (allocated now if this compact bitmap had none).</summary>
    internal ulong[] Words => _words ?? Materialise();

    /// <summary>Whether every page is clear (false) or set (true) without a look at words; null when words hold the pages.</summary>
    internal bool? Uniform => _words is null ? _uniformSet : null;

    public long WordCount { get; }

    private ulong[] Materialise()
    {
        var words = _spare ?? new ulong[WordCount];
        bool reused = _spare is not null;
        _spare = null;
        if (_uniformSet) FillSet(words, PageCount);
        else if (reused) Array.Clear(words);
        _words = words;
        return words;
    }

    private static void FillSet(ulong[] words, long pageCount)
    {
        Array.Fill(words, ulong.MaxValue);
        int tail = (int)(pageCount & 63);
        if (tail != 0) words[^1] = (1UL << tail) - 1;
    }

    /// <summary>Every page clear (<paramref name="set"/> false) or set: a compact bitmap lets its words go.</summary>
    private void MakeUniform(bool set)
    {
        if (_compact)
        {
            // A round's harvest clears and refills the same set every round: keep the words for that.
            if (_words is not null) _spare = _words;
            _words = null;
            _uniformSet = set && PageCount > 0;
        }
        else if (set) FillSet(_words!, PageCount);
        else Array.Clear(_words!);
    }

    /// <summary>64 pages' bits, page <c>64 × index</c> in bit 0.</summary>
    public ulong Word(long index)
    {
        if (_words is { } w) return Volatile.Read(ref w[index]);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(index, WordCount);
        if (!_uniformSet) return 0;
        int tail = (int)(PageCount & 63);
        return index == WordCount - 1 && tail != 0 ? (1UL << tail) - 1 : ulong.MaxValue;
    }

    public void SetWord(long index, ulong bits) => Volatile.Write(ref Words[index], bits);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Set(long page)
    {
        ref ulong w = ref Words[page >> 6];
        ulong bit = 1UL << (int)(page & 63);
        // Plain read first: a page that is already marked (the common case for hot pages)
        // costs no locked instruction.
        if ((Volatile.Read(ref w) & bit) == 0) Interlocked.Or(ref w, bit);
    }

    /// <summary>Non-atomic set for single-threaded builders (the engine's own bitmaps).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void SetUnsynchronized(long page) => Words[page >> 6] |= 1UL << (int)(page & 63);

    public void SetRange(long first, long count)
    {
        if (first <= 0 && first + count >= PageCount && count > 0) { MakeUniform(true); return; }
        if (_words is null && _uniformSet) return;
        ulong[] words = Words;
        for (long p = first; p < first + count;)
        {
            if ((p & 63) == 0 && p + 64 <= first + count) { words[p >> 6] = ulong.MaxValue; p += 64; }
            else { words[p >> 6] |= 1UL << (int)(p & 63); p++; }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool IsSet(long page) => _words is { } w ? (Volatile.Read(ref w[page >> 6]) & (1UL << (int)(page & 63))) != 0 : _uniformSet && (ulong)page < (ulong)PageCount;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Clear(long page) => Interlocked.And(ref Words[page >> 6], ~(1UL << (int)(page & 63)));

    public void ClearAll() => MakeUniform(false);

    public void SetAll() => MakeUniform(true);

    /// <summary>ORs every set bit into <paramref name="into"/> and clears this bitmap, atomically per word.</summary>
    public long HarvestInto(PageBitmap into)
    {
        if (into.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(into));
        if (_words is null)
        {
            if (!_uniformSet) return 0;
            into.Or(this);
            MakeUniform(false);
            return PageCount;
        }
        long count = 0;
        ulong[] src = _words, dst = into.Words;
        for (int i = 0; i < src.Length; i++)
        {
            if (Volatile.Read(ref src[i]) == 0) continue;
            ulong v = Interlocked.Exchange(ref src[i], 0);
            dst[i] |= v;
            count += BitOperations.PopCount(v);
        }
        return count;
    }

    /// <summary>ORs <paramref name="other"/> into this bitmap (single-threaded).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)] // a pass over every page, per round: straight to optimised code
    public void Or(PageBitmap other)
    {
        if (other.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(other));
        if (other.Uniform is { } set)
        {
            if (set) MakeUniform(true);
            return;
        }
        if (_words is null && _uniformSet) return;
        var a = Words.AsSpan();
        ReadOnlySpan<ulong> b = other._words;
        int i = 0;
        // A vector of words at a time: the simulator runs this per round over every page.
        for (; i + Vector<ulong>.Count <= a.Length; i += Vector<ulong>.Count)
            (new Vector<ulong>(a[i..]) | new Vector<ulong>(b[i..])).CopyTo(a[i..]);
        for (; i < a.Length; i++) a[i] |= b[i];
    }

    /// <summary>Makes this bitmap a copy of <paramref name="other"/> (single-threaded).</summary>
    public void CopyFrom(PageBitmap other)
    {
        if (other.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(other));
        if (other.Uniform is { } set) MakeUniform(set);
        else other._words.AsSpan().CopyTo(Words);
    }

    /// <summary>Clears every page set in <paramref name="other"/>; returns how many were set here (single-threaded).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)] // a pass over every page, per round: straight to optimised code
    public long AndNot(PageBitmap other)
    {
        if (other.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(other));
        if (other.Uniform is { } set)
        {
            if (!set) return 0;
            long was = Count();
            MakeUniform(false);
            return was;
        }
        if (_words is null && !_uniformSet) return 0;
        var a = Words.AsSpan();
        ReadOnlySpan<ulong> b = other._words;
        long cleared = 0;
        int i = 0;
        if (Avx512BW.IsSupported)
        {
            var sum = Vector512<ulong>.Zero;
            ref ulong pa = ref MemoryMarshal.GetReference(a);
            ref ulong pb = ref MemoryMarshal.GetReference(b);
            for (; i + 8 <= a.Length; i += 8)
            {
                var va = Vector512.LoadUnsafe(ref pa, (nuint)i);
                var vb = Vector512.LoadUnsafe(ref pb, (nuint)i);
                sum += PopCount8(va & vb);
                Vector512.AndNot(va, vb).StoreUnsafe(ref pa, (nuint)i);
            }
            cleared = (long)Vector512.Sum(sum);
        }
        // No branch on the words: on scattered pages a branch per word mispredicts half the time.
        for (; i < a.Length; i++)
        {
            ulong both = a[i] & b[i];
            cleared += BitOperations.PopCount(both);
            a[i] &= ~b[i];
        }
        return cleared;
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)] // a pass over every page, per round: straight to optimised code
    public long Count()
    {
        if (_words is null) return _uniformSet ? PageCount : 0;
        ReadOnlySpan<ulong> w = _words;
        int i = 0;
        long n0 = 0, n1 = 0, n2 = 0, n3 = 0;
        if (Avx512BW.IsSupported)
        {
            var sum = Vector512<ulong>.Zero;
            ref ulong at = ref MemoryMarshal.GetReference(w);
            for (; i + 8 <= w.Length; i += 8) sum += PopCount8(Vector512.LoadUnsafe(ref at, (nuint)i));
            n0 = (long)Vector512.Sum(sum);
        }
        // Four sums: the popcounts do not wait on one another.
        for (; i + 4 <= w.Length; i += 4)
        {
            n0 += BitOperations.PopCount(w[i]);
            n1 += BitOperations.PopCount(w[i + 1]);
            n2 += BitOperations.PopCount(w[i + 2]);
            n3 += BitOperations.PopCount(w[i + 3]);
        }
        for (; i < w.Length; i++) n0 += BitOperations.PopCount(w[i]);
        return n0 + n1 + n2 + n3;
    }

    /// <summary>
    /// The bits set in each of eight words (AVX-512BW: a nibble table lookup per byte, then the
    /// bytes summed per word — Muła's method; the simulator counts every page set a few times a
    /// round, and word-by-word popcounts were a third of a dirtying run).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector512<ulong> PopCount8(Vector512<ulong> v)
    {
        var table = Vector512.Create((byte)0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                     0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
        var low = Vector512.Create((byte)0x0F);
        var bytes = v.AsByte();
        var counts = Avx512BW.Shuffle(table, bytes & low) + Avx512BW.Shuffle(table, Vector512.ShiftRightLogical(bytes.AsUInt16(), 4).AsByte() & low);
        return Avx512BW.SumAbsoluteDifferences(counts, Vector512<byte>.Zero).AsUInt64();
    }

    /// <summary>Next set page at or after <paramref name="from"/>, or -1.</summary>
    public long NextSet(long from)
    {
        if (from >= PageCount) return -1;
        if (_words is not { } words) return _uniformSet ? Math.Max(from, 0) : -1;
        int i = (int)(from >> 6);
        ulong w = words[i] & (ulong.MaxValue << (int)(from & 63));
        while (true)
        {
            if (w != 0) return ((long)i << 6) + BitOperations.TrailingZeroCount(w);
            if (++i >= words.Length) return -1;
            w = words[i];
        }
    }

    /// <summary>The runs of set pages, ascending: (first page, count).</summary>
    public List<(long First, long Count)> Runs()
    {
        var runs = new List<(long, long)>();
        for (long p = NextSet(0); p >= 0;)
        {
            long end = p + 1;
            while (end < PageCount && IsSet(end)) end++;
            runs.Add((p, end - p));
            p = NextSet(end);
        }
        return runs;
    }
}
