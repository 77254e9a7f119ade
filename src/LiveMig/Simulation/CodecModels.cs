using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Traces;

namespace LiveMig.Simulation;

/// <summary>Page compression in a simulated migration (the engine's <c>--compress</c>).</summary>
public enum SimCompression { None, Lz4, Zstd, Adaptive }

/// <summary>The page pipeline a simulated migration runs: compression, the XBZRLE cache (0: off) and dedup, as the engine's options.</summary>
public sealed record SimPipeline(SimCompression Compression = SimCompression.None, long XbzrleCacheBytes = 0, bool Dedup = false)
{
    public static readonly SimPipeline Baseline = new();

    public override string ToString()
    {
        var parts = new List<string>();
        if (Compression != SimCompression.None) parts.Add(Compression.ToString().ToLowerInvariant());
        if (XbzrleCacheBytes > 0) parts.Add("xbzrle=" + Units.Bytes(XbzrleCacheBytes));
        if (Dedup) parts.Add("dedup");
        return parts.Count == 0 ? "none" : string.Join(",", parts);
    }
}

/// <summary>
/// The codecs' wire bytes and CPU cost per page, by content class. The figures are the
/// project's own codec micro-benchmarks (docs/benchmarks.md, "Codec micro-benchmarks":
/// BenchmarkDotNet, one 4 KiB page per operation, AMD EPYC 2.45 GHz, 2 cores, .NET 10, on a
/// machine shared and busy at the time — load average 10–16 — so the speeds are several times
/// below a quiet core's; the ratios between codecs are the reliable part). Where the benchmark
/// has no class of its own the mapping is said next to the figure.
/// </summary>
public static class CodecModel
{
    public const int PageSize = PageClasses.PageSize;

    // Encode speeds, pages per second (the table "Encode / decode, pages per second").
    /// <summary>raw, text page: the zero check and the copy into the frame.</summary>
    public const double RawPagesPerSecond = 2.74e6;
    /// <summary>raw, zero page: the zero check alone (a zero marker is written).</summary>
    public const double ZeroCheckPagesPerSecond = 6.52e6;
    /// <summary>lz4 (level 0), text page; also used for every compressible class.</summary>
    public const double Lz4PagesPerSecond = 36.4e3;
    /// <summary>lz4, random page: a full attempt, then the page goes raw.</summary>
    public const double Lz4RejectPagesPerSecond = 235.4e3;
    /// <summary>zstd (level 3, the engine's default), text page.</summary>
    public const double ZstdPagesPerSecond = 7.4e3;
    /// <summary>zstd 3, random page: attempted, rejected.</summary>
    public const double ZstdRejectPagesPerSecond = 53.7e3;
    /// <summary>adaptive, random page: the entropy sample says incompressible, the page goes raw; the sample's cost is this less raw's.</summary>
    public const double AdaptiveRandomPagesPerSecond = 284.8e3;
    /// <summary>raw, random page (for the sample's cost above).</summary>
    public const double RawRandomPagesPerSecond = 6.66e6;
    /// <summary>xbzrle: the delta of a page against its cached copy (text pages, 8 small writes).</summary>
    public const double XbzrlePagesPerSecond = 873.2e3;
    /// <summary>dedup: xxHash3-128 of the page and the index lookup (text pages).</summary>
    public const double DedupPagesPerSecond = 2.17e6;

    // Wire bytes (the table "Wire bytes per page", from --ratios).
    /// <summary>lz4 on a text page: 2371 of 4096 bytes (the SomewhatCompressible class, ≤ 5/8, which the hand model's "compressible" share is).</summary>
    public const double Lz4TextBytes = 2371;
    /// <summary>zstd 3 on a text page: 1290 bytes.</summary>
    public const double ZstdTextBytes = 1290;
    /// <summary>xbzrle: 85 bytes for a page with 8 random 8-byte writes (64 bytes changed): its runs' headers cost a third more than the bytes.</summary>
    public const double XbzrleBytesPerChangedByte = 85.0 / 64;
    /// <summary>A dedup reference: the holder page and the hash (docs/protocol.md).</summary>
    public const double DedupReferenceBytes = 20;
    /// <summary>XBZRLE sends a delta only up to 7/8 of a page (else overflow: the page goes on to compression), and compression is kept only if it saves an eighth.</summary>
    public const double KeepLimit = PageSize * 7.0 / 8;

    /// <summary>Sampled entropy (bits per byte) the adaptive stage would see for a class: text-like pages about 4.5, highly redundant ones under 3, random about 7.2 (Pipeline/Adaptive.cs).</summary>
    public static double Entropy(PageContent c) => c switch
    {
        PageContent.VeryCompressible => 2.0,
        PageContent.Incompressible => 7.2,
        _ => 4.5,
    };

    /// <summary>
    /// LZ4's output ÷ input for a class. The recorder's classes are LZ4 size bands (≤ 1/8, 3/8,
    /// 5/8, 7/8 of a page); the model takes each band's middle, except the ≤ 5/8 band, which holds
    /// the benchmark's text page and takes its measured 2371/4096. Incompressible: 1 (sent raw).
    /// </summary>
    public static double Lz4Ratio(PageContent c) => c switch
    {
        PageContent.VeryCompressible => 1.0 / 16,
        PageContent.Compressible => 0.25,
        PageContent.SomewhatCompressible => Lz4TextBytes / PageSize,
        PageContent.BarelyCompressible => 0.75,
        _ => 1.0,
    };

    /// <summary>Zstd's ratio: LZ4's scaled by what Zstd 3 saved over LZ4 on text (1290 ÷ 2371), the only class both were measured on.</summary>
    public static double ZstdRatio(PageContent c) => c == PageContent.Incompressible ? 1.0 : Lz4Ratio(c) * (ZstdTextBytes / Lz4TextBytes);

    public static CodecFigures Lz4Figures(PageContent c) => new(Lz4PagesPerSecond * PageSize, Lz4Ratio(c));
    public static CodecFigures ZstdFigures(PageContent c) => new(ZstdPagesPerSecond * PageSize, ZstdRatio(c));

    /// <summary>The compressor <paramref name="compression"/> uses for a page of class <paramref name="c"/>, the adaptive one through the engine's own <see cref="AdaptivePolicy"/> at link speed <paramref name="link"/>.</summary>
    public static AdaptiveChoice Choose(SimCompression compression, PageContent c, double link) => compression switch
    {
        SimCompression.Lz4 => AdaptiveChoice.Lz4,
        SimCompression.Zstd => AdaptiveChoice.Zstd,
        SimCompression.Adaptive => AdaptivePolicy.Choose(Entropy(c), link, Lz4Figures(c), ZstdFigures(c)),
        _ => AdaptiveChoice.Raw,
    };

    /// <summary>Payload bytes and encode seconds of one page of class <paramref name="c"/> through compression <paramref name="choice"/> (raw if it does not save an eighth).</summary>
    public static (double Bytes, double Seconds) Compress(AdaptiveChoice choice, PageContent c)
    {
        bool incompressible = c == PageContent.Incompressible;
        return choice switch
        {
            AdaptiveChoice.Lz4 when !incompressible => (Lz4Ratio(c) * PageSize, 1 / Lz4PagesPerSecond),
            AdaptiveChoice.Lz4 => (PageSize, 1 / Lz4RejectPagesPerSecond),
            AdaptiveChoice.Zstd when !incompressible => (ZstdRatio(c) * PageSize, 1 / ZstdPagesPerSecond),
            AdaptiveChoice.Zstd => (PageSize, 1 / ZstdRejectPagesPerSecond),
            _ => (PageSize, 1 / RawPagesPerSecond),
        };
    }

    /// <summary>What the adaptive stage's entropy sample costs on top of the page's encoding.</summary>
    public const double AdaptiveSampleSeconds = 1 / AdaptiveRandomPagesPerSecond - 1 / RawRandomPagesPerSecond;

    /// <summary>Wire bytes of a batch's framing: the frame header and the batch header, per batch of about 1 MiB of entries.</summary>
    public const int BatchFramingBytes = FrameFormat.HeaderSize + PageBatchWriter.BatchHeaderSize;
    public const int EntryHeaderBytes = PageBatchWriter.EntryHeaderSize;
    public const int BatchBytes = PageBatchWriter.TargetBatchBytes;
}
