using System.Diagnostics;
using LiveMig.Memory;
using LiveMig.Transport;

namespace LiveMig.Pipeline;

/// <summary>
/// Byte entropy of a small sample of a page (Jin et al. 2009, characteristic-based
/// compression: look at the content before spending CPU on it). 256 bytes in four 64-byte
/// slices spread over the page; the estimate is in bits per byte, 0..8 (a 256-byte sample of
/// random bytes gives about 7.2, text about 4–5, a page of a few repeated values under 2).
/// </summary>
public static class ByteEntropy
{
    public const int SampleBytes = 256;
    private const int Slice = 64;

    // Delta[c] = (c+1)·log2(c+1) − c·log2(c): adding one more occurrence of a symbol seen c times.
    private static readonly double[] Delta = BuildDelta();

    private static double[] BuildDelta()
    {
        var d = new double[SampleBytes + 1];
        static double F(int c) => c == 0 ? 0 : c * Math.Log2(c);
        for (int c = 0; c < d.Length; c++) d[c] = F(c + 1) - F(c);
        return d;
    }

    public static double OfSample(ReadOnlySpan<byte> page)
    {
        Span<ushort> counts = stackalloc ushort[256];
        counts.Clear();
        double sum = 0; // Σ c·log2(c) over symbols, built incrementally
        int step = page.Length / 4;
        for (int s = 0; s < 4; s++)
        {
            // Slices at 0, step+64, 2·step+128, 3·step+192 (wrapped): not aligned to the same offset of each quarter.
            int start = Math.Min(s * step + s * Slice, page.Length - Slice);
            foreach (byte b in page.Slice(start, Slice)) sum += Delta[counts[b]++];
        }
        return Math.Log2(SampleBytes) - sum / SampleBytes;
    }
}

/// <summary>Measured figures of one compressor on one class of pages: input bytes per CPU second and output/input.</summary>
public readonly record struct CodecFigures(double InputBytesPerSecond, double Ratio);

/// <summary>What the adaptive stage does with one page.</summary>
public enum AdaptiveChoice : byte { Raw, Lz4, Zstd }

/// <summary>
/// The decision of the adaptive stage, kept free of I/O and clocks so it can be tested with
/// injected numbers. Encoding and sending overlap: while the thread encodes the next page, the
/// link keeps carrying what it was given (the socket's send buffer drains, the rate limiter's
/// bucket refills), so the slower of the two sets the pace: raw costs size/link per page, a
/// codec max(size/throughput, ratio·size/link). The cheapest wins (on a tie, the one that sends
/// less); when a codec encodes slower than the link carries raw pages (throughput &lt; link),
/// compressing would hold the link up: the CPU is the bottleneck, send raw.
/// (Before 2026-11 this was CPU time plus wire time, as if the link stood still while the thread
/// encoded: with a busy CPU that made LZ4 look too slow for a 1 Gbit/s link and pages went raw.)
/// </summary>
public static class AdaptivePolicy
{
    /// <summary>Above this sampled entropy a page is taken as incompressible (random, already compressed).</summary>
    public const double IncompressibleBits = 6.6;
    /// <summary>Below this a page is highly redundant: LZ4 gets nearly all there is to get, much faster.</summary>
    public const double RedundantBits = 3.0;

    /// <summary>Priors before anything is measured (one core of a current x86 server, 4 KiB pages).</summary>
    public static readonly CodecFigures Lz4Prior = new(600e6, 0.5), ZstdPrior = new(150e6, 0.35);

    /// <summary>Link speed assumed until the first batch has been timed (1 Gbit/s).</summary>
    public const double UnknownLinkBytesPerSecond = 125e6;

    /// <summary>Picks a codec for a page whose sampled entropy is <paramref name="entropyBits"/>.</summary>
    public static AdaptiveChoice Choose(double entropyBits, double linkBytesPerSecond, CodecFigures lz4, CodecFigures zstd)
    {
        if (entropyBits >= IncompressibleBits) return AdaptiveChoice.Raw;
        double link = linkBytesPerSecond > 0 ? linkBytesPerSecond : UnknownLinkBytesPerSecond;
        double raw = 1 / link;
        double costLz4 = Cost(lz4, link);
        double costZstd = entropyBits < RedundantBits ? double.PositiveInfinity : Cost(zstd, link);
        bool lz4Pays = costLz4 <= raw && lz4.Ratio < 1, zstdPays = costZstd <= raw && zstd.Ratio < 1;
        if (!lz4Pays && !zstdPays) return AdaptiveChoice.Raw;
        if (lz4Pays && zstdPays)
        {
            // Equal pace (both keep up with the link): the one that sends less.
            if (costLz4 == costZstd) return zstd.Ratio < lz4.Ratio ? AdaptiveChoice.Zstd : AdaptiveChoice.Lz4;
            return costLz4 < costZstd ? AdaptiveChoice.Lz4 : AdaptiveChoice.Zstd;
        }
        return lz4Pays ? AdaptiveChoice.Lz4 : AdaptiveChoice.Zstd;
    }

    /// <summary>Seconds per input byte: the slower of encoding it and sending what is left (the two overlap).</summary>
    public static double Cost(CodecFigures f, double link) =>
        f.InputBytesPerSecond <= 0 ? double.PositiveInfinity : Math.Max(1 / f.InputBytesPerSecond, Math.Clamp(f.Ratio, 0, 1) / link);

    /// <summary>True when compressing with <paramref name="f"/> is slower than sending raw: the CPU, not the link, is the bottleneck.</summary>
    public static bool CpuBound(CodecFigures f, double linkBytesPerSecond) => Cost(f, linkBytesPerSecond) > 1 / linkBytesPerSecond;
}

/// <summary>
/// Per-encoder state of the adaptive stage: figures per codec and page class (redundant /
/// ordinary), refreshed by every compression it does, plus a probe of the codec it did not pick
/// every <see cref="ProbeEvery"/> pages of a class so that figures do not go stale.
/// <para>Speed is the median of the last <see cref="Window"/> timed pages (a decaying median),
/// not an average: a page timed across a preemption (the thread lost its core for a few
/// milliseconds on a busy machine) or the first pages run before the JIT optimised the codec
/// only ever look slower, and one such page in a window moves a median not at all, whereas an
/// average took dozens of pages to forget it — long enough, with the codec no longer chosen, to
/// send a whole migration raw. The ratio, which preemption does not touch, is an EWMA.</para>
/// Times are in ticks of the <see cref="TimeProvider"/> the encoder measures with (tests give a
/// fake one). One per encoder (thread): not thread-safe.
/// </summary>
public sealed class AdaptiveState
{
    public const int ProbeEvery = 64;
    /// <summary>Timed pages per codec and class that the speed is the median of.</summary>
    public const int Window = 15;
    private const double Weight = 0.05;

    // [class, codec]: class 0 = redundant, 1 = ordinary; codec 0 = LZ4, 1 = Zstd.
    private readonly CodecFigures[,] _figures = { { AdaptivePolicy.Lz4Prior, AdaptivePolicy.ZstdPrior }, { AdaptivePolicy.Lz4Prior, AdaptivePolicy.ZstdPrior } };
    private readonly double[,][] _samples = { { new double[Window], new double[Window] }, { new double[Window], new double[Window] } };
    private readonly int[,] _sampleCount = new int[2, 2];
    private readonly double[] _sorted = new double[Window];
    private readonly int[] _seen = new int[2];
    private readonly double _frequency;

    /// <param name="timestampFrequency">Ticks per second of the times given to <see cref="Observe"/> (default: <see cref="Stopwatch.Frequency"/>).</param>
    public AdaptiveState(long timestampFrequency = 0) => _frequency = timestampFrequency > 0 ? timestampFrequency : Stopwatch.Frequency;

    public CodecFigures Figures(bool redundant, AdaptiveChoice codec) => _figures[redundant ? 0 : 1, codec == AdaptiveChoice.Zstd ? 1 : 0];

    /// <summary>
    /// The choice for a page, and whether it is a probe (a codec tried to refresh its figures
    /// rather than because it is best). <paramref name="allowProbe"/> false (the stop-and-copy,
    /// inside the downtime): only the best-known codec.
    /// </summary>
    public AdaptiveChoice Choose(double entropy, double link, out bool probe, bool allowProbe = true)
    {
        probe = false;
        if (entropy >= AdaptivePolicy.IncompressibleBits) return AdaptiveChoice.Raw;
        bool redundant = entropy < AdaptivePolicy.RedundantBits;
        int cls = redundant ? 0 : 1;
        var best = AdaptivePolicy.Choose(entropy, link, _figures[cls, 0], _figures[cls, 1]);
        if (++_seen[cls] % ProbeEvery == 0 && allowProbe)
        {
            // Round-robin over the codecs of the class (Zstd is never used on redundant pages).
            var pick = redundant || (_seen[cls] / ProbeEvery) % 2 == 0 ? AdaptiveChoice.Lz4 : AdaptiveChoice.Zstd;
            if (pick != best) { probe = true; return pick; }
        }
        return best;
    }

    /// <summary>Records one compression: ticks it took and output bytes (or the page size when it did not fit).</summary>
    public void Observe(bool redundant, AdaptiveChoice codec, long ticks, int outputBytes)
    {
        int cls = redundant ? 0 : 1, k = codec == AdaptiveChoice.Zstd ? 1 : 0;
        ref CodecFigures f = ref _figures[cls, k];
        double seconds = Math.Max(ticks, 1) / _frequency;
        var window = _samples[cls, k];
        int n = _sampleCount[cls, k]++;
        window[n % Window] = seconds;
        int filled = Math.Min(n + 1, Window);
        window.AsSpan(0, filled).CopyTo(_sorted);
        var sorted = _sorted.AsSpan(0, filled);
        sorted.Sort();
        // Median (the lower one of an even count: a window still filling leans fast, as the priors do).
        double median = sorted[(filled - 1) / 2];
        double ratio = Math.Clamp(outputBytes / (double)GuestMemory.PageSize, 0, 1);
        f = new CodecFigures(GuestMemory.PageSize / median, n == 0 ? ratio : f.Ratio * (1 - Weight) + ratio * Weight);
    }
}

/// <summary>
/// What the link carries per second: the rate limiter's cap when one is set, else the rate the
/// socket accepted data while the sender was blocked writing to it (time inside the stream's
/// Write, so encoding time does not count against the link). Shared by all writers of a
/// migration; thread-safe.
/// </summary>
public sealed class LinkEstimate(RateLimiter? limiter = null)
{
    private readonly object _lock = new();
    private double _measured;

    /// <summary>Bytes per second the link is taken to carry; 0 while unknown.</summary>
    public double BytesPerSecond
    {
        get
        {
            double m = Volatile.Read(ref _measured);
            long cap = limiter?.BytesPerSecond ?? 0;
            if (cap > 0) return m > 0 ? Math.Min(cap, m) : cap;
            return m;
        }
    }

    /// <summary>A batch of <paramref name="bytes"/> took <paramref name="writeTicks"/> (of a clock ticking <paramref name="ticksPerSecond"/>) inside the stream's Write.</summary>
    public void Observe(long bytes, long writeTicks, long ticksPerSecond)
    {
        if (bytes <= 0) return;
        double rate = bytes / (Math.Max(writeTicks, 1) / (double)ticksPerSecond);
        lock (_lock) Volatile.Write(ref _measured, _measured <= 0 ? rate : _measured * 0.8 + rate * 0.2);
    }

    /// <summary>For tests and simulators: sets the measured rate.</summary>
    public void Set(double bytesPerSecond) { lock (_lock) Volatile.Write(ref _measured, bytesPerSecond); }
}
