using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>
/// Which stages of the page pipeline a migration uses (source side). Every stage but free-page
/// skipping needs the destination's support: the source requires the matching capability bits,
/// and a destination that lacks one refuses the migration naming it.
/// </summary>
public sealed record PipelineOptions
{
    /// <summary>The XBZRLE cache <c>--optimize all</c> uses (QEMU's default size).</summary>
    public const long DefaultXbzrleCacheBytes = 64L << 20;

    /// <summary>Compressor for pages no earlier stage took.</summary>
    public CompressionKind Compression { get; init; } = CompressionKind.None;

    /// <summary>Level of the compressor: LZ4 0–12 (0 = fast), Zstd −5–19 (0 = its default 3); for adaptive, the Zstd level. Null = the codec's default.</summary>
    public int? CompressionLevel { get; init; }

    /// <summary>Bytes of already-sent pages kept for XBZRLE deltas; 0 = no XBZRLE.</summary>
    public long XbzrleCacheBytes { get; init; }

    /// <summary>Send a reference instead of content the destination already holds (this VM, or any VM it received: gang migration).</summary>
    public bool Dedup { get; init; }

    /// <summary>Do not send pages the guest reports free; the destination keeps them zero.</summary>
    public bool SkipFreePages { get; init; }

    /// <summary>No stage on: pages go as zero markers or raw, as with the baseline encoder.</summary>
    public bool IsBaseline => Compression == CompressionKind.None && XbzrleCacheBytes == 0 && !Dedup && !SkipFreePages;

    /// <summary>The best combination of the stages (what <c>--optimize all</c> turns on).</summary>
    public static PipelineOptions All { get; } = new()
    {
        Compression = CompressionKind.Adaptive,
        XbzrleCacheBytes = DefaultXbzrleCacheBytes,
        Dedup = true,
        SkipFreePages = true,
    };

    /// <summary>The capability bits these stages need from the destination (the source requires all of them).</summary>
    public Capabilities Capabilities =>
        (Compression is CompressionKind.Lz4 or CompressionKind.Adaptive ? Capabilities.Lz4 : 0)
        | (Compression is CompressionKind.Zstd or CompressionKind.Adaptive ? Capabilities.Zstd : 0)
        | (XbzrleCacheBytes > 0 ? Capabilities.Xbzrle : 0)
        | (Dedup ? Capabilities.Dedup : 0);

    /// <summary>Throws <see cref="ArgumentException"/> naming the bad setting.</summary>
    public void Validate()
    {
        if (XbzrleCacheBytes < 0) throw new ArgumentException($"XBZRLE cache size {XbzrleCacheBytes} is negative");
        if (XbzrleCacheBytes > 0 && XbzrleCacheBytes < Memory.GuestMemory.PageSize) throw new ArgumentException($"XBZRLE cache of {XbzrleCacheBytes} bytes holds no page (at least 4096)");
        if (CompressionLevel is int l)
        {
            switch (Compression)
            {
                case CompressionKind.Lz4 when l < 0 || l > Lz4Page.MaxLevel:
                    throw new ArgumentException($"LZ4 level {l} is out of range (0..{Lz4Page.MaxLevel})");
                case CompressionKind.Zstd or CompressionKind.Adaptive when l < ZstdPageCompressor.MinLevel || l > ZstdPageCompressor.MaxLevel:
                    throw new ArgumentException($"zstd level {l} is out of range ({ZstdPageCompressor.MinLevel}..{ZstdPageCompressor.MaxLevel})");
                case CompressionKind.None:
                    throw new ArgumentException("a compression level without a compressor");
            }
        }
    }

    /// <summary>Short description for logs: <c>compress=zstd:3 xbzrle=64.0 MiB dedup skip-free-pages</c>, or <c>none</c>.</summary>
    public override string ToString()
    {
        var parts = new List<string>();
        if (Compression != CompressionKind.None)
            parts.Add("compress=" + Compression.ToString().ToLowerInvariant() + (CompressionLevel is int l ? ":" + l : ""));
        if (XbzrleCacheBytes > 0) parts.Add("xbzrle=" + Units.Bytes(XbzrleCacheBytes));
        if (Dedup) parts.Add("dedup");
        if (SkipFreePages) parts.Add("skip-free-pages");
        return parts.Count == 0 ? "none" : string.Join(' ', parts);
    }
}
