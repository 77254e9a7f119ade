using System.Numerics;
using System.Runtime.CompilerServices;

namespace LiveMig.Memory;

/// <summary>
/// One bit per guest page. <see cref="Set"/> is lock-free and safe from any number of
/// writers; <see cref="HarvestInto"/> reads and clears in one pass over 64-bit words, so a
/// write racing the harvest lands either in this harvest or the next, never in neither.
/// </summary>
public sealed class PageBitmap
{
    private readonly ulong[] _words;

    public PageBitmap(long pageCount)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pageCount);
        PageCount = pageCount;
        _words = new ulong[(pageCount + 63) / 64];
    }

    public long PageCount { get; }

    internal ulong[] Words => _words;

    public long WordCount => _words.Length;

    /// <summary>64 pages' bits, page <c>64 × index</c> in bit 0.</summary>
    public ulong Word(long index) => Volatile.Read(ref _words[index]);

    public void SetWord(long index, ulong bits) => Volatile.Write(ref _words[index], bits);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Set(long page)
    {
        ref ulong w = ref _words[page >> 6];
        ulong bit = 1UL << (int)(page & 63);
        // Plain read first: a page that is already marked (the common case for hot pages)
        // costs no locked instruction.
        if ((Volatile.Read(ref w) & bit) == 0) Interlocked.Or(ref w, bit);
    }

    /// <summary>Non-atomic set for single-threaded builders (the engine's own bitmaps).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void SetUnsynchronized(long page) => _words[page >> 6] |= 1UL << (int)(page & 63);

    public void SetRange(long first, long count)
    {
        for (long p = first; p < first + count;)
        {
            if ((p & 63) == 0 && p + 64 <= first + count) { _words[p >> 6] = ulong.MaxValue; p += 64; }
            else { SetUnsynchronized(p); p++; }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool IsSet(long page) => (Volatile.Read(ref _words[page >> 6]) & (1UL << (int)(page & 63))) != 0;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Clear(long page) => Interlocked.And(ref _words[page >> 6], ~(1UL << (int)(page & 63)));

    public void ClearAll() => Array.Clear(_words);

    public void SetAll()
    {
        Array.Fill(_words, ulong.MaxValue);
        int tail = (int)(PageCount & 63);
        if (tail != 0) _words[^1] = (1UL << tail) - 1;
    }

    /// <summary>ORs every set bit into <paramref name="into"/> and clears this bitmap, atomically per word.</summary>
    public long HarvestInto(PageBitmap into)
    {
        if (into.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(into));
        long count = 0;
        ulong[] dst = into._words;
        for (int i = 0; i < _words.Length; i++)
        {
            if (Volatile.Read(ref _words[i]) == 0) continue;
            ulong v = Interlocked.Exchange(ref _words[i], 0);
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
        var a = _words.AsSpan();
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
        other._words.AsSpan().CopyTo(_words);
    }

    /// <summary>Clears every page set in <paramref name="other"/>; returns how many were set here (single-threaded).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)] // a pass over every page, per round: straight to optimised code
    public long AndNot(PageBitmap other)
    {
        if (other.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(other));
        var a = _words.AsSpan();
        ReadOnlySpan<ulong> b = other._words;
        long cleared = 0;
        // No branch on the words: on scattered pages a branch per word mispredicts half the time.
        for (int i = 0; i < a.Length; i++)
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
        long n0 = 0, n1 = 0;
        ReadOnlySpan<ulong> w = _words;
        int i = 0;
        for (; i + 2 <= w.Length; i += 2)
        {
            n0 += BitOperations.PopCount(w[i]);
            n1 += BitOperations.PopCount(w[i + 1]);
        }
        if (i < w.Length) n0 += BitOperations.PopCount(w[i]);
        return n0 + n1;
    }

    /// <summary>Next set page at or after <paramref name="from"/>, or -1.</summary>
    public long NextSet(long from)
    {
        if (from >= PageCount) return -1;
        int i = (int)(from >> 6);
        ulong w = _words[i] & (ulong.MaxValue << (int)(from & 63));
        while (true)
        {
            if (w != 0) return ((long)i << 6) + BitOperations.TrailingZeroCount(w);
            if (++i >= _words.Length) return -1;
            w = _words[i];
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
