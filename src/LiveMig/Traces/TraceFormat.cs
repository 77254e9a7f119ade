using System.Buffers.Binary;
using System.IO.Hashing;
using System.Text;

namespace LiveMig.Traces;

/// <summary>
/// The on-disk layout (docs/trace-format.md): a header, then records, each
/// <c>kind u8 | codec u8 | stored u32 | raw u32 | xxHash32(stored) u32 | stored bytes</c>, the last
/// one the seal (<see cref="RecordKind.End"/>). Little-endian; varints are unsigned LEB128.
/// </summary>
internal static class TraceFormat
{
    public const uint Magic = 0x52544D4C; // "LMTR"
    public const ushort Version = 1;
    public const int RecordHeaderSize = 14;
    /// <summary>A record above this is taken as corruption rather than allocated (a 1M-page interval packs to well under it).</summary>
    public const int MaxRecordBytes = 256 << 20;
    /// <summary>Kinds at or above this may be skipped by a reader that does not know them (additions need no new version).</summary>
    public const byte FirstOptionalKind = 128;

    public enum RecordKind : byte { Interval = 1, End = 2 }
    public enum Codec : byte { None = 0, Zstd = 1 }

    public static uint Checksum(ReadOnlySpan<byte> data) => XxHash32.HashToUInt32(data);

    public static void WriteVarint(Stream s, ulong v)
    {
        while (v >= 0x80) { s.WriteByte((byte)(v | 0x80)); v >>= 7; }
        s.WriteByte((byte)v);
    }

    public static void WriteString(Stream s, string text)
    {
        byte[] b = Encoding.UTF8.GetBytes(text);
        WriteVarint(s, (ulong)b.Length);
        s.Write(b);
    }
}

/// <summary>Reads varints and strings from a record's bytes, naming the record in its errors.</summary>
internal ref struct RecordCursor(ReadOnlySpan<byte> data, string where)
{
    private readonly ReadOnlySpan<byte> _data = data;
    private int _pos;

    public readonly bool AtEnd => _pos == _data.Length;

    public ulong Varint()
    {
        ulong v = 0;
        for (int shift = 0; shift < 64; shift += 7)
        {
            if (_pos >= _data.Length) throw Bad("ends inside a number");
            byte b = _data[_pos++];
            v |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80) return v;
        }
        throw Bad("has a number longer than 64 bits");
    }

    public int Int(long max, string what)
    {
        ulong v = Varint();
        if (v > (ulong)max) throw Bad($"has {what} {v}, above {max}");
        return (int)v;
    }

    public byte Byte()
    {
        if (_pos >= _data.Length) throw Bad("is cut short");
        return _data[_pos++];
    }

    public string String()
    {
        int n = Int(1 << 20, "a string length");
        if (_pos + n > _data.Length) throw Bad("is cut short inside a string");
        string s = Encoding.UTF8.GetString(_data.Slice(_pos, n));
        _pos += n;
        return s;
    }

    public readonly InvalidDataException Bad(string what) => new($"trace: {where} {what}");
}

internal static class TraceHeaderCodec
{
    /// <summary>magic u32 | version u16 | page size u32 | interval µs u32 | started (Unix ms) i64 | source (varint length + UTF-8) | xxHash32 of all before it u32.</summary>
    public static byte[] Encode(TraceHeader h)
    {
        var ms = new MemoryStream();
        Span<byte> fixedPart = stackalloc byte[22];
        BinaryPrimitives.WriteUInt32LittleEndian(fixedPart, TraceFormat.Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(fixedPart[4..], TraceFormat.Version);
        BinaryPrimitives.WriteUInt32LittleEndian(fixedPart[6..], (uint)h.PageSize);
        BinaryPrimitives.WriteUInt32LittleEndian(fixedPart[10..], (uint)Math.Clamp(h.NominalInterval.Ticks / 10, 0, uint.MaxValue));
        BinaryPrimitives.WriteInt64LittleEndian(fixedPart[14..], h.Started.ToUnixTimeMilliseconds());
        ms.Write(fixedPart);
        TraceFormat.WriteString(ms, h.Source.Length > 4096 ? h.Source[..4096] : h.Source);
        Span<byte> sum = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(sum, TraceFormat.Checksum(ms.GetBuffer().AsSpan(0, (int)ms.Length)));
        ms.Write(sum);
        return ms.ToArray();
    }

    public static TraceHeader Decode(Stream s)
    {
        var fixedPart = new byte[22];
        if (ReadFully(s, fixedPart) < fixedPart.Length) throw new InvalidDataException("trace: file ends inside the header (truncated or not a trace)");
        if (BinaryPrimitives.ReadUInt32LittleEndian(fixedPart) != TraceFormat.Magic) throw new InvalidDataException("trace: not a LiveMig trace (bad magic at byte 0)");
        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(fixedPart.AsSpan(4));
        if (version != TraceFormat.Version) throw new InvalidDataException($"trace: format version {version} is not supported (this build reads {TraceFormat.Version})");
        var rest = new MemoryStream();
        rest.Write(fixedPart);
        // The source string: a varint length then that many bytes (at most 4 KiB plus its length).
        int len = 0, shift = 0, b;
        do
        {
            b = s.ReadByte();
            if (b < 0) throw new InvalidDataException("trace: file ends inside the header");
            rest.WriteByte((byte)b);
            len |= (b & 0x7F) << shift;
            shift += 7;
        } while (b >= 0x80 && shift < 21);
        if (len > 16384) throw new InvalidDataException($"trace: header source of {len} bytes (corrupt header)");
        var tail = new byte[len + 4];
        if (ReadFully(s, tail) < tail.Length) throw new InvalidDataException("trace: file ends inside the header");
        rest.Write(tail, 0, len);
        uint stored = BinaryPrimitives.ReadUInt32LittleEndian(tail.AsSpan(len));
        if (stored != TraceFormat.Checksum(rest.GetBuffer().AsSpan(0, (int)rest.Length))) throw new InvalidDataException("trace: header checksum mismatch (corrupt header)");
        int pageSize = (int)BinaryPrimitives.ReadUInt32LittleEndian(fixedPart.AsSpan(6));
        if (pageSize != PageClasses.PageSize) throw new InvalidDataException($"trace: page size {pageSize} is not supported (4096 only)");
        return new TraceHeader
        {
            PageSize = pageSize,
            NominalInterval = TimeSpan.FromTicks(BinaryPrimitives.ReadUInt32LittleEndian(fixedPart.AsSpan(10)) * 10L),
            Started = DateTimeOffset.FromUnixTimeMilliseconds(BinaryPrimitives.ReadInt64LittleEndian(fixedPart.AsSpan(14))),
            Source = Encoding.UTF8.GetString(tail, 0, len),
        };
    }

    public static int ReadFully(Stream s, Span<byte> into)
    {
        int got = 0;
        while (got < into.Length)
        {
            int n = s.Read(into[got..]);
            if (n == 0) break;
            got += n;
        }
        return got;
    }
}
