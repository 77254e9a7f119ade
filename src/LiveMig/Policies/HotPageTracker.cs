using System.Numerics;
using System.Runtime.InteropServices;
using LiveMig.Memory;

namespace LiveMig.Policies;

/// <summary>
/// Finds the writable working set (Clark et al. 2005; Ma et al. 2010): one byte per page holds
/// which of the last <see cref="Window"/> rounds (at most 8) dirtied it, bit 0 the newest. A page
/// dirtied in at least <see cref="Threshold"/> of them is hot: sending it in a live round is
/// likely wasted, as it will be dirtied again before the stop-and-copy. Costs one byte per page
/// and one pass over them per round (clean stretches are skipped 8 pages at a time).
/// </summary>
public sealed class HotPageTracker
{
    private readonly byte[] _history;
    private readonly ulong _windowMask;

    public HotPageTracker(long pageCount, int window = 3, int threshold = 2)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pageCount);
        if (window is < 1 or > 8) throw new ArgumentOutOfRangeException(nameof(window), "must be 1..8 rounds");
        if (threshold < 1 || threshold > window) throw new ArgumentOutOfRangeException(nameof(threshold), $"must be 1..{window} (the window)");
        PageCount = pageCount;
        Window = window;
        Threshold = threshold;
        _history = new byte[(pageCount + 63) / 64 * 64];
        _windowMask = ((1UL << window) - 1) * 0x0101010101010101UL;
    }

    public long PageCount { get; }
    public int Window { get; }
    public int Threshold { get; }
    /// <summary>Rounds observed so far.</summary>
    public int Rounds { get; private set; }

    /// <summary>How many of the last <see cref="Window"/> rounds dirtied the page.</summary>
    public int Heat(long page) => BitOperations.PopCount((uint)_history[page]);

    public bool IsHot(long page) => Heat(page) >= Threshold;

    /// <summary>Records one round: the pages dirtied during it.</summary>
    public void Observe(PageBitmap dirtied)
    {
        if (dirtied.PageCount != PageCount) throw new ArgumentException("bitmap size differs from the tracker's", nameof(dirtied));
        ulong[] words = dirtied.Words;
        Span<ulong> history = MemoryMarshal.Cast<byte, ulong>(_history.AsSpan());
        for (int i = 0; i < words.Length; i++)
        {
            // 64 pages = 64 history bytes = 8 ulongs; shift every byte left by one, dropping what leaves the window.
            Span<ulong> h = history.Slice(i * 8, 8);
            for (int j = 0; j < 8; j++)
            {
                ulong x = h[j];
                if (x == 0) continue;
                h[j] = (x << 1) & 0xFEFEFEFEFEFEFEFEUL & _windowMask;
            }
            ulong w = words[i];
            int baseIndex = i * 64;
            while (w != 0)
            {
                int bit = BitOperations.TrailingZeroCount(w);
                _history[baseIndex + bit] |= 1;
                w &= w - 1;
            }
        }
        Rounds++;
    }

    /// <summary>
    /// Splits <paramref name="pending"/>: cold pages go into <paramref name="sendNow"/> (which is
    /// cleared first); hot ones stay out of it, up to <paramref name="maxDeferred"/> of them (the
    /// rest are sent too). Returns the number of pages to send; <paramref name="deferred"/> is
    /// the number held back.
    /// </summary>
    public long Select(PageBitmap pending, PageBitmap sendNow, long maxDeferred, out long deferred)
    {
        if (pending.PageCount != PageCount || sendNow.PageCount != PageCount) throw new ArgumentException("bitmap size differs from the tracker's");
        ulong[] src = pending.Words, dst = sendNow.Words;
        long send = 0;
        deferred = 0;
        for (int i = 0; i < src.Length; i++)
        {
            ulong w = src[i], keep = w;
            int baseIndex = i * 64;
            while (w != 0 && deferred < maxDeferred)
            {
                int bit = BitOperations.TrailingZeroCount(w);
                w &= w - 1;
                if (BitOperations.PopCount((uint)_history[baseIndex + bit]) >= Threshold)
                {
                    keep &= ~(1UL << bit);
                    deferred++;
                }
            }
            dst[i] = keep;
            send += BitOperations.PopCount(keep);
        }
        return send;
    }
}
