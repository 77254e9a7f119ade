namespace LiveMig.Pipeline;

/// <summary>
/// Per-page encoding tag on the wire. The numbers are part of the format: never reuse one.
/// Later codecs (LZ4, Zstd, XBZRLE, dedup references) get new tags behind capability bits.
/// </summary>
public enum PageEncoding : byte
{
    /// <summary>The page's 4096 bytes as they are.</summary>
    Raw = 0,
    /// <summary>The page is all zero; no payload.</summary>
    Zero = 1,
}

/// <summary>Pages and payload bytes per encoding, for the report.</summary>
public sealed class EncodingCounters
{
    public const int Kinds = 2;
    private readonly long[] _pages = new long[Kinds];
    private readonly long[] _bytes = new long[Kinds];

    public void Add(PageEncoding e, int payloadBytes) { _pages[(int)e]++; _bytes[(int)e] += payloadBytes; }

    /// <summary>Pages handled without going through the encoder (holes in round 0 are zero pages nobody sends).</summary>
    public void AddPages(PageEncoding e, long pages) => _pages[(int)e] += pages;
    public long Pages(PageEncoding e) => _pages[(int)e];
    public long Bytes(PageEncoding e) => _bytes[(int)e];

    public Dictionary<string, long> PagesByName()
    {
        var d = new Dictionary<string, long>();
        for (int i = 0; i < Kinds; i++) d[Name((PageEncoding)i)] = _pages[i];
        return d;
    }

    public static string Name(PageEncoding e) => e switch { PageEncoding.Raw => "raw", PageEncoding.Zero => "zero", _ => e.ToString().ToLowerInvariant() };
}
