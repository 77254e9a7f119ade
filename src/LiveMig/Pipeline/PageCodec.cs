using LiveMig.Memory;
using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>
/// Source side of the per-page encoding: given a page's content, write its cheapest encoding.
/// One instance per sending thread: an encoder may keep scratch state; state shared across
/// threads (an XBZRLE cache, a dedup index) must be safe for that. <see cref="MaxEncodedSize"/>
/// bounds what any encoder may write.
/// </summary>
public interface IPageEncoder
{
    /// <summary>Encodes <paramref name="data"/> into <paramref name="destination"/>; returns the tag and the bytes written.</summary>
    PageEncoding Encode(long page, ReadOnlySpan<byte> data, Span<byte> destination, out int written);

    /// <summary>A round begins (stages such as XBZRLE behave differently in round 0).</summary>
    void BeginRound(int round) { }

    /// <summary>
    /// The verification hash of the content the last <see cref="Encode"/> described, when it was
    /// neither zero nor raw and the encoder took it from its own copy of the page (the guest may
    /// have written the page since). False: hash the page yourself.
    /// </summary>
    bool TryGetContentHash(out ulong hash) { hash = 0; return false; }
}

/// <summary>Destination side: rebuild a page from its encoding. Throws <see cref="ProtocolException"/> on a bad payload.</summary>
public interface IPageDecoder
{
    void Decode(long page, PageEncoding encoding, ReadOnlySpan<byte> payload, Span<byte> target);
}

public static class PageCodec
{
    /// <summary>No encoding may produce more than this (a raw page is the fallback, so more is never useful).</summary>
    public const int MaxEncodedSize = GuestMemory.PageSize;

    public static bool IsZero(ReadOnlySpan<byte> page) => !page.ContainsAnyExcept((byte)0);
}

/// <summary>The baseline every peer speaks: a zero marker or the raw page.</summary>
public sealed class BasicPageEncoder : IPageEncoder
{
    public static readonly BasicPageEncoder Instance = new();

    public PageEncoding Encode(long page, ReadOnlySpan<byte> data, Span<byte> destination, out int written)
    {
        if (PageCodec.IsZero(data)) { written = 0; return PageEncoding.Zero; }
        data.CopyTo(destination);
        written = GuestMemory.PageSize;
        return PageEncoding.Raw;
    }
}

public sealed class BasicPageDecoder : IPageDecoder
{
    public static readonly BasicPageDecoder Instance = new();

    public void Decode(long page, PageEncoding encoding, ReadOnlySpan<byte> payload, Span<byte> target)
    {
        switch (encoding)
        {
            case PageEncoding.Raw:
                if (payload.Length != GuestMemory.PageSize) throw new ProtocolException($"raw page {page} has {payload.Length} bytes, not {GuestMemory.PageSize}");
                payload.CopyTo(target);
                break;
            case PageEncoding.Zero:
                if (payload.Length != 0) throw new ProtocolException($"zero page {page} carries {payload.Length} bytes");
                target.Clear();
                break;
            default:
                throw new ProtocolException($"unknown page encoding {(byte)encoding} for page {page} (not negotiated or not known)");
        }
    }
}
