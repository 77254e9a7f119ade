namespace LiveMig.Pipeline;

/// <summary>
/// Per-page encoding tag on the wire. The numbers are part of the format: never reuse one.
/// Every tag but raw and zero appears only behind its capability bit (docs/protocol.md).
/// </summary>
public enum PageEncoding : byte
{
    /// <summary>The page's 4096 bytes as they are.</summary>
    Raw = 0,
    /// <summary>The page is all zero; no payload.</summary>
    Zero = 1,
    /// <summary>An LZ4 block that decompresses to exactly one page (capability <c>Lz4</c>).</summary>
    Lz4 = 2,
    /// <summary>A Zstandard frame that decompresses to exactly one page (capability <c>Zstd</c>).</summary>
    Zstd = 3,
    /// <summary>A run-length-encoded delta against the copy of this page the destination holds (capability <c>Xbzrle</c>).</summary>
    Xbzrle = 4,
    /// <summary>A reference to identical content the destination holds: u32 holder page + 16-byte xxHash3-128 (capability <c>Dedup</c>).</summary>
    Dedup = 5,
}

/// <summary>Pages and payload bytes per encoding, for the report.</summary>
public sealed class EncodingCounters
{
    /// <summary>Number of wire encodings (tags 0..Kinds-1).</summary>
    public const int Kinds = 6;
    private readonly long[] _pages = new long[Kinds];
    private readonly long[] _bytes = new long[Kinds];

    public void Add(PageEncoding e, int payloadBytes) { _pages[(int)e]++; _bytes[(int)e] += payloadBytes; }

    /// <summary>Payload bytes of a page counted already (sent again).</summary>
    public void AddBytes(PageEncoding e, int payloadBytes) => _bytes[(int)e] += payloadBytes;

    /// <summary><paramref name="pages"/> pages whose payloads came to <paramref name="payloadBytes"/> together (counted elsewhere, e.g. by native code).</summary>
    public void Add(PageEncoding e, long pages, long payloadBytes) { _pages[(int)e] += pages; _bytes[(int)e] += payloadBytes; }

    /// <summary>Pages handled without going through the encoder (holes in round 0 are zero pages nobody sends; gang-deduplicated pages).</summary>
    public void AddPages(PageEncoding e, long pages) => _pages[(int)e] += pages;

    /// <summary>Pages never sent because the guest reported them free (the destination keeps them zero).</summary>
    public long Skipped { get; private set; }

    public void AddSkipped(long pages) => Skipped += pages;

    /// <summary>Adds another set of counters (one per data stream) into this one.</summary>
    public void Merge(EncodingCounters other)
    {
        for (int i = 0; i < Kinds; i++) { _pages[i] += other._pages[i]; _bytes[i] += other._bytes[i]; }
        Skipped += other.Skipped;
    }

    public long Pages(PageEncoding e) => _pages[(int)e];
    public long Bytes(PageEncoding e) => _bytes[(int)e];

    /// <summary>Pages that went out as an entry of a PageBatch, whatever their encoding.</summary>
    public long TotalPages() { long n = 0; foreach (long p in _pages) n += p; return n; }

    /// <summary>Payload bytes of every encoding together (entry headers not included).</summary>
    public long TotalBytes() { long n = 0; foreach (long b in _bytes) n += b; return n; }

    /// <summary>The report's <c>pagesByEncoding</c>: every key, always (<c>raw zero lz4 zstd xbzrle dedup skipped</c>).</summary>
    public Dictionary<string, long> PagesByName()
    {
        var d = new Dictionary<string, long>();
        for (int i = 0; i < Kinds; i++) d[Name((PageEncoding)i)] = _pages[i];
        d["skipped"] = Skipped;
        return d;
    }

    public static string Name(PageEncoding e) => e switch
    {
        PageEncoding.Raw => "raw", PageEncoding.Zero => "zero", PageEncoding.Lz4 => "lz4", PageEncoding.Zstd => "zstd",
        PageEncoding.Xbzrle => "xbzrle", PageEncoding.Dedup => "dedup", _ => e.ToString().ToLowerInvariant(),
    };
}
