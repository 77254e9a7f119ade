using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace LiveMig.Memory;

/// <summary>
/// One bit per guest page in native (unmovable) memory, so that native code (the userfaultfd
/// fault-service thread) and managed code can share it without pinning. Every single-bit
/// operation is atomic; <see cref="TrySet"/> and <see cref="TryClear"/> say whether this call
/// changed the bit, which is how two threads agree on who sends or places a page.
/// </summary>
public sealed unsafe class NativePageBitmap : IDisposable
{
    private ulong* _words;

    public NativePageBitmap(long pageCount)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pageCount);
        PageCount = pageCount;
        WordCount = (pageCount + 63) / 64;
        _words = (ulong*)NativeMemory.AllocZeroed((nuint)Math.Max(1, WordCount * 8));
    }

    public long PageCount { get; }
    public long WordCount { get; }
    internal ulong* Words => _words != null ? _words : throw new ObjectDisposedException(nameof(NativePageBitmap));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool IsSet(long page) => (Volatile.Read(ref _words[page >> 6]) & (1UL << (int)(page & 63))) != 0;

    /// <summary>Sets the bit; true when it was clear before (this caller set it).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TrySet(long page)
    {
        ulong bit = 1UL << (int)(page & 63);
        ref ulong w = ref _words[page >> 6];
        if ((Volatile.Read(ref w) & bit) != 0) return false;
        return (Interlocked.Or(ref w, bit) & bit) == 0;
    }

    /// <summary>Clears the bit; true when it was set before (this caller cleared it).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryClear(long page)
    {
        ulong bit = 1UL << (int)(page & 63);
        ref ulong w = ref _words[page >> 6];
        if ((Volatile.Read(ref w) & bit) == 0) return false;
        return (Interlocked.And(ref w, ~bit) & bit) != 0;
    }

    public void Set(long page) => TrySet(page);

    public long Count()
    {
        long n = 0;
        for (long i = 0; i < WordCount; i++) n += BitOperations.PopCount(Volatile.Read(ref _words[i]));
        return n;
    }

    /// <summary>Next set page at or after <paramref name="from"/>, or -1.</summary>
    public long NextSet(long from)
    {
        if (from < 0) from = 0;
        if (from >= PageCount) return -1;
        long i = from >> 6;
        ulong w = Volatile.Read(ref _words[i]) & (ulong.MaxValue << (int)(from & 63));
        while (true)
        {
            if (w != 0)
            {
                long p = (i << 6) + BitOperations.TrailingZeroCount(w);
                return p < PageCount ? p : -1;
            }
            if (++i >= WordCount) return -1;
            w = Volatile.Read(ref _words[i]);
        }
    }

    /// <summary>Copies <paramref name="from"/> (same size) into this bitmap; not atomic as a whole.</summary>
    public void CopyFrom(PageBitmap from)
    {
        if (from.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(from));
        from.Words.AsSpan().CopyTo(new Span<ulong>(_words, (int)WordCount));
    }

    public void CopyTo(PageBitmap into)
    {
        if (into.PageCount != PageCount) throw new ArgumentException("bitmaps differ in size", nameof(into));
        new ReadOnlySpan<ulong>(_words, (int)WordCount).CopyTo(into.Words);
    }

    /// <summary>Word <paramref name="index"/> (64 pages from index × 64).</summary>
    public ulong Word(long index) => Volatile.Read(ref _words[index]);

    /// <summary>Clears <paramref name="bits"/> in word <paramref name="index"/> atomically; returns those of them that were set.</summary>
    public ulong ClearBits(long index, ulong bits) => Interlocked.And(ref _words[index], ~bits) & bits;

    public void SetWord(long index, ulong value)
    {
        if (index == WordCount - 1 && (PageCount & 63) != 0) value &= (1UL << (int)(PageCount & 63)) - 1;
        Volatile.Write(ref _words[index], value);
    }

    public void Dispose()
    {
        ulong* w = _words;
        _words = null;
        if (w != null) NativeMemory.Free(w);
    }
}
