using K4os.Compression.LZ4;
using LiveMig.Memory;
using LiveMig.Protocol;
using ZstdSharp;

namespace LiveMig.Pipeline;

/// <summary>Which compressor the pipeline uses for pages that no earlier stage took.</summary>
public enum CompressionKind
{
    None,
    Lz4,
    Zstd,
    /// <summary>Raw, LZ4 or Zstd per page from a content sample, and none while the CPU rather than the link is the bottleneck.</summary>
    Adaptive,
}

/// <summary>LZ4 block compression of single pages (K4os.Compression.LZ4). Stateless: safe from any thread.</summary>
public static class Lz4Page
{
    public const int DefaultLevel = 0;
    public const int MaxLevel = 12;

    /// <summary>Level 0–2: LZ4 fast; 3–9: LZ4-HC; 10–12: the optimal parsers (slow).</summary>
    public static LZ4Level Level(int level) => level switch
    {
        <= 2 => LZ4Level.L00_FAST,
        >= MaxLevel => LZ4Level.L12_MAX,
        _ => (LZ4Level)level,
    };

    /// <summary>Compresses into <paramref name="destination"/>; returns the size, or -1 when the result does not fit (did not save enough).</summary>
    public static int Encode(ReadOnlySpan<byte> page, Span<byte> destination, LZ4Level level)
    {
        int n = LZ4Codec.Encode(page, destination, level);
        return n > 0 ? n : -1;
    }

    public static void Decode(long page, ReadOnlySpan<byte> payload, Span<byte> target)
    {
        if (payload.Length == 0 || payload.Length >= GuestMemory.PageSize)
            throw new ProtocolException($"LZ4 page {page} has {payload.Length} bytes (must be 1..{GuestMemory.PageSize - 1})");
        int n;
        try { n = LZ4Codec.Decode(payload, target); }
        catch (Exception e) when (e is ArgumentException or InvalidOperationException or IndexOutOfRangeException or InvalidDataException)
        {
            throw new ProtocolException($"LZ4 page {page}: corrupt payload of {payload.Length} bytes ({e.Message})");
        }
        if (n != GuestMemory.PageSize)
            throw new ProtocolException(n < 0
                ? $"LZ4 page {page}: corrupt payload of {payload.Length} bytes"
                : $"LZ4 page {page}: decompresses to {n} bytes, not {GuestMemory.PageSize}");
    }
}

/// <summary>
/// Zstandard compression of single pages (ZstdSharp). A <see cref="ZstdPageCompressor"/> holds a
/// compression context: one per encoder (thread), never shared.
/// </summary>
public sealed class ZstdPageCompressor : IDisposable
{
    public const int DefaultLevel = 3;
    public const int MinLevel = -5;
    public const int MaxLevel = 19;

    private readonly Compressor _z;

    public ZstdPageCompressor(int level)
    {
        if (level < MinLevel || level > MaxLevel) throw new ArgumentOutOfRangeException(nameof(level), level, $"zstd level must be {MinLevel}..{MaxLevel}");
        Level = level == 0 ? DefaultLevel : level;
        _z = new Compressor(Level);
    }

    public int Level { get; }

    /// <summary>Compresses into <paramref name="destination"/>; returns the size, or -1 when the result does not fit.</summary>
    public int Encode(ReadOnlySpan<byte> page, Span<byte> destination)
    {
        try { return _z.TryWrap(page, destination, out int n) ? n : -1; }
        catch (ZstdException) { return -1; }
    }

    public void Dispose() => _z.Dispose();
}

/// <summary>Zstandard decompression of single pages; one per decoder, never shared.</summary>
public sealed class ZstdPageDecompressor : IDisposable
{
    private readonly Decompressor _z = new();

    public void Decode(long page, ReadOnlySpan<byte> payload, Span<byte> target)
    {
        if (payload.Length == 0 || payload.Length >= GuestMemory.PageSize)
            throw new ProtocolException($"Zstd page {page} has {payload.Length} bytes (must be 1..{GuestMemory.PageSize - 1})");
        int n;
        try
        {
            if (!_z.TryUnwrap(payload, target, out n))
                throw new ProtocolException($"Zstd page {page}: payload decompresses to more than {GuestMemory.PageSize} bytes");
        }
        catch (ZstdException e) { throw new ProtocolException($"Zstd page {page}: corrupt payload of {payload.Length} bytes ({e.Message})"); }
        if (n != GuestMemory.PageSize) throw new ProtocolException($"Zstd page {page}: decompresses to {n} bytes, not {GuestMemory.PageSize}");
    }

    public void Dispose() => _z.Dispose();
}
