using System.Buffers.Binary;
using BenchmarkDotNet.Attributes;
using LiveMig.Memory;
using LiveMig.Pipeline;

namespace LiveMig.Micro;

/// <summary>The page contents the codecs are measured on: 256 pages of one kind.</summary>
public static class PageSets
{
    public const int Pages = 256;
    public const int Size = GuestMemory.PageSize;

    private static readonly byte[] Vocabulary = "the of and to in is for that with on as by this from at memory page guest vcpu kernel migration dirty round copy send "u8.ToArray();

    /// <summary>zero, random, text (MemoryFill's text pages) or mixed (MemoryFill's mix: 35% zero, 25% random, 40% text).</summary>
    public static byte[][] Make(string kind, int seed = 1)
    {
        var rng = new Random(seed);
        var pages = new byte[Pages][];
        for (int i = 0; i < Pages; i++)
        {
            string k = kind != "mixed" ? kind : rng.Next(100) switch { < 35 => "zero", < 60 => "random", _ => "text" };
            var p = new byte[Size];
            if (k == "random") rng.NextBytes(p);
            else if (k == "text")
            {
                int at = 0;
                while (at < Size)
                {
                    int start = rng.Next(Vocabulary.Length - 12), len = 4 + rng.Next(8);
                    for (int c = 0; c < len && at < Size; c++) p[at++] = Vocabulary[start + c];
                }
            }
            pages[i] = p;
        }
        return pages;
    }

    /// <summary>The same pages after 8 random 8-byte writes each (what the random workload does between rounds).</summary>
    public static byte[][] Dirty(byte[][] pages, int seed = 2)
    {
        var rng = new Random(seed);
        return pages.Select(p =>
        {
            var q = (byte[])p.Clone();
            for (int w = 0; w < 8; w++) BinaryPrimitives.WriteInt64LittleEndian(q.AsSpan(rng.Next(Size / 8) * 8), rng.NextInt64());
            return q;
        }).ToArray();
    }
}

/// <summary>
/// Each codec on one kind of page, per page (OperationsPerInvoke = 256 pages). Encode includes
/// the attempt that does not pay (an incompressible page is tried, then sent raw); decode
/// decodes what encode produced (raw pages are copied).
/// </summary>
[MemoryDiagnoser(false)]
public class CodecBenchmarks
{
    [Params("zero", "random", "text", "mixed")]
    public string Content { get; set; } = "text";

    [Params("raw", "lz4", "zstd1", "zstd3", "adaptive", "xbzrle", "dedup")]
    public string Codec { get; set; } = "lz4";

    private byte[][] _pages = [];
    private byte[][] _old = [];
    private readonly byte[] _out = new byte[PageSets.Size];
    private readonly byte[] _target = new byte[PageSets.Size];
    private byte[][] _encoded = [];
    private int[] _lengths = [];
    private ZstdPageCompressor? _zstd;
    private readonly ZstdPageDecompressor _unzstd = new();
    private SourcePipeline? _adaptive;
    private PipelineEncoder? _adaptiveEncoder;
    private DedupSourceIndex? _index;
    private byte[][] _dedupMemory = [];

    [GlobalSetup]
    public void Setup()
    {
        _old = PageSets.Make(Content);
        _pages = Codec == "xbzrle" ? PageSets.Dirty(_old) : _old;
        if (Codec is "zstd1" or "zstd3") _zstd = new ZstdPageCompressor(Codec == "zstd1" ? 1 : 3);
        if (Codec == "adaptive")
        {
            // A 1 Gbit/s link: worth compressing what compresses well.
            _adaptive = new SourcePipeline(new PipelineOptions { Compression = CompressionKind.Adaptive }, PageSets.Pages);
            _adaptive.Link.Set(125e6);
            _adaptiveEncoder = _adaptive.CreateEncoder();
        }
        if (Codec == "dedup")
        {
            // Half the pages were sent before (their content is indexed), half are new.
            _index = new DedupSourceIndex(PageSets.Pages * 2);
            for (int i = 0; i < PageSets.Pages; i += 2) _index.Sent(PageSets.Pages + i, ContentHash.Of(_pages[i]));
            _dedupMemory = _pages.Concat(_pages).ToArray();
        }
        _encoded = new byte[PageSets.Pages][];
        _lengths = new int[PageSets.Pages];
        for (int i = 0; i < PageSets.Pages; i++)
        {
            var buf = new byte[PageSets.Size];
            _lengths[i] = EncodeOne(i, buf);
            _encoded[i] = buf;
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _zstd?.Dispose();
        _unzstd.Dispose();
        _adaptive?.Dispose();
    }

    /// <summary>Payload length, or −1 for a page that goes raw.</summary>
    private int EncodeOne(int i, Span<byte> into)
    {
        byte[] page = _pages[i];
        Span<byte> budget = into[..PipelineEncoder.Budget];
        switch (Codec)
        {
            case "raw":
                if (PageCodec.IsZero(page)) return 0;
                page.CopyTo(into);
                return -1;
            case "lz4": return Lz4Page.Encode(page, budget, Lz4Page.Level(0));
            case "zstd1" or "zstd3": return _zstd!.Encode(page, budget);
            case "adaptive":
                var e = _adaptiveEncoder!.Encode(i, page, into, out int n);
                return e is PageEncoding.Raw ? -1 : (int)e << 16 | n;
            case "xbzrle": return XbzrleDelta.Encode(page, _old[i], budget);
            case "dedup":
                var h = ContentHash.Of(page);
                long holder = _index!.Holder(h);
                if (holder < 0) return -1;
                BinaryPrimitives.WriteUInt32LittleEndian(into, (uint)holder);
                ContentHash.Write(h, into[4..]);
                return PipelineEncoder.DedupPayloadSize;
            default: throw new ArgumentException(Codec);
        }
    }

    [Benchmark(OperationsPerInvoke = PageSets.Pages)]
    public int Encode()
    {
        int total = 0;
        for (int i = 0; i < PageSets.Pages; i++) total += EncodeOne(i, _out);
        return total;
    }

    [Benchmark(OperationsPerInvoke = PageSets.Pages)]
    public void Decode()
    {
        for (int i = 0; i < PageSets.Pages; i++)
        {
            int n = _lengths[i];
            byte[] payload = _encoded[i];
            if (n < 0) { payload.CopyTo(_target, 0); continue; }
            switch (Codec)
            {
                case "raw": _target.AsSpan().Clear(); break;
                case "lz4": Lz4Page.Decode(i, payload.AsSpan(0, n), _target); break;
                case "zstd1" or "zstd3": _unzstd.Decode(i, payload.AsSpan(0, n), _target); break;
                case "adaptive":
                    var e = (PageEncoding)(n >> 16);
                    int len = n & 0xFFFF;
                    if (e == PageEncoding.Lz4) Lz4Page.Decode(i, payload.AsSpan(0, len), _target);
                    else if (e == PageEncoding.Zstd) _unzstd.Decode(i, payload.AsSpan(0, len), _target);
                    else _target.AsSpan().Clear();
                    break;
                case "xbzrle":
                    _old[i].CopyTo(_target, 0);
                    XbzrleDelta.Apply(i, payload.AsSpan(0, n), _target);
                    break;
                case "dedup":
                    // Verify the holder's content, then copy it.
                    uint holder = BinaryPrimitives.ReadUInt32LittleEndian(payload);
                    byte[] src = _dedupMemory[holder];
                    if (ContentHash.Of(src) != ContentHash.Read(payload.AsSpan(4))) throw new InvalidOperationException();
                    src.CopyTo(_target, 0);
                    break;
            }
        }
    }

    /// <summary>Bytes on the wire per page for this codec and content (payload; a raw page counts 4096, a zero page 0).</summary>
    public double WireBytesPerPage()
    {
        Setup();
        double total = 0;
        for (int i = 0; i < PageSets.Pages; i++)
        {
            int n = _lengths[i];
            total += n < 0 ? PageSets.Size : Codec == "adaptive" ? n & 0xFFFF : n;
        }
        Cleanup();
        return total / PageSets.Pages;
    }
}
