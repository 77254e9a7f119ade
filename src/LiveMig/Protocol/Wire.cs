using System.Buffers.Binary;
using System.Text;

namespace LiveMig.Protocol;

/// <summary>
/// A malformed, hostile or unexpected stream. The message says what and where.
/// <see cref="LinkFailure"/> marks the ones the network can cause (the peer closed, the
/// connection failed, a frame was corrupted in transit): a resumable migration reconnects after
/// those, never after a protocol violation.
/// </summary>
public sealed class ProtocolException(string message, bool linkFailure = false) : Exception(message)
{
    public bool LinkFailure { get; } = linkFailure;
}

/// <summary>Little-endian writer over a span; the caller sized the span.</summary>
public ref struct SpanWriter(Span<byte> span)
{
    private readonly Span<byte> _span = span;
    public int Position { get; private set; }

    public void U8(byte v) { _span[Position] = v; Position += 1; }
    public void U16(ushort v) { BinaryPrimitives.WriteUInt16LittleEndian(_span[Position..], v); Position += 2; }
    public void U32(uint v) { BinaryPrimitives.WriteUInt32LittleEndian(_span[Position..], v); Position += 4; }
    public void U64(ulong v) { BinaryPrimitives.WriteUInt64LittleEndian(_span[Position..], v); Position += 8; }
    public void I64(long v) => U64((ulong)v);
    public void Bytes(ReadOnlySpan<byte> b) { b.CopyTo(_span[Position..]); Position += b.Length; }

    /// <summary>UTF-8 with a u16 length; longer strings are cut at <paramref name="maxBytes"/>.</summary>
    public void String(string s, int maxBytes = 1024)
    {
        int n = Encoding.UTF8.GetBytes(s.AsSpan(0, Math.Min(s.Length, maxBytes)), _span[(Position + 2)..]);
        n = Math.Min(n, maxBytes);
        U16((ushort)n);
        Position += n;
    }

    public readonly Span<byte> Remaining => _span[Position..];
    public void Advance(int n) => Position += n;
}

/// <summary>Little-endian reader that refuses to read past its span, naming the message and field.</summary>
public ref struct SpanReader(ReadOnlySpan<byte> span, string what)
{
    private readonly ReadOnlySpan<byte> _span = span;
    private readonly string _what = what;
    public int Position { get; private set; }
    public readonly int Remaining => _span.Length - Position;

    private readonly void Need(int n, string field)
    {
        if (Remaining < n) throw new ProtocolException($"{_what}: truncated at {field} (byte {Position}, need {n}, have {Remaining})");
    }

    public byte U8(string field) { Need(1, field); return _span[Position++]; }
    public ushort U16(string field) { Need(2, field); var v = BinaryPrimitives.ReadUInt16LittleEndian(_span[Position..]); Position += 2; return v; }
    public uint U32(string field) { Need(4, field); var v = BinaryPrimitives.ReadUInt32LittleEndian(_span[Position..]); Position += 4; return v; }
    public ulong U64(string field) { Need(8, field); var v = BinaryPrimitives.ReadUInt64LittleEndian(_span[Position..]); Position += 8; return v; }
    public long I64(string field) => (long)U64(field);

    public ReadOnlySpan<byte> Bytes(int n, string field) { Need(n, field); var s = _span.Slice(Position, n); Position += n; return s; }

    public string String(string field, int maxBytes = 1024)
    {
        int n = U16(field + ".length");
        if (n > maxBytes) throw new ProtocolException($"{_what}: {field} is {n} bytes, limit {maxBytes}");
        var b = Bytes(n, field);
        return Encoding.UTF8.GetString(b);
    }

    public readonly void End()
    {
        if (Remaining != 0) throw new ProtocolException($"{_what}: {Remaining} unexpected trailing bytes");
    }
}
