using System.Buffers.Binary;
using ZstdSharp;

namespace LiveMig.Traces;

/// <summary>
/// Reads a trace from any stream (no other I/O, so a simulator can use it): the header at
/// construction, then intervals in order until the seal. Anything wrong — truncation, a checksum
/// mismatch, an unknown version or record kind — is an <see cref="InvalidDataException"/> that
/// says what and at which byte.
/// </summary>
public sealed class TraceReader : IDisposable
{
    private readonly Stream _stream;
    private readonly bool _leaveOpen;
    private readonly Decompressor _zstd = new();
    private readonly byte[] _head = new byte[TraceFormat.RecordHeaderSize];
    private long _offset;
    private int _nextIndex;

    public TraceReader(Stream stream, bool leaveOpen = false)
    {
        _stream = stream;
        _leaveOpen = leaveOpen;
        var counting = new CountingStream(stream);
        Header = TraceHeaderCodec.Decode(counting);
        _offset = counting.Count;
    }

    public TraceHeader Header { get; }

    /// <summary>The seal, once <see cref="ReadNext"/> has returned null.</summary>
    public TraceEnd? End { get; private set; }

    /// <summary>The next interval, or null after the seal (which it checks against what was read).</summary>
    public TraceInterval? ReadNext()
    {
        if (End is not null) return null;
        while (true)
        {
            long at = _offset;
            var head = _head.AsSpan();
            int got = TraceHeaderCodec.ReadFully(_stream, head);
            if (got == 0) throw new InvalidDataException($"trace: ends at byte {at} after {_nextIndex} intervals without its end record (truncated, or not sealed)");
            if (got < head.Length) throw new InvalidDataException($"trace: truncated inside the record header at byte {at}");
            byte kind = head[0], codec = head[1];
            uint storedLen = BinaryPrimitives.ReadUInt32LittleEndian(head[2..]), rawLen = BinaryPrimitives.ReadUInt32LittleEndian(head[6..]);
            uint sum = BinaryPrimitives.ReadUInt32LittleEndian(head[10..]);
            if (storedLen > TraceFormat.MaxRecordBytes || rawLen > TraceFormat.MaxRecordBytes) throw new InvalidDataException($"trace: record at byte {at} claims {Math.Max(storedLen, rawLen)} bytes (corrupt)");
            var stored = new byte[storedLen];
            if (TraceHeaderCodec.ReadFully(_stream, stored) < stored.Length) throw new InvalidDataException($"trace: truncated inside the record at byte {at} ({storedLen} bytes expected)");
            _offset = at + head.Length + storedLen;
            if (TraceFormat.Checksum(stored) != sum) throw new InvalidDataException($"trace: checksum mismatch in the record at byte {at} (corrupt)");
            if (kind >= TraceFormat.FirstOptionalKind) continue; // an optional addition this build does not know
            byte[] raw = Unpack(stored, codec, (int)rawLen, at);
            string where = $"record at byte {at}";
            switch ((TraceFormat.RecordKind)kind)
            {
                case TraceFormat.RecordKind.Interval:
                    var iv = TraceIntervalCodec.Decode(raw, where);
                    if (iv.Index != _nextIndex) throw new InvalidDataException($"trace: {where} is interval {iv.Index}, expected {_nextIndex}");
                    _nextIndex++;
                    return iv;
                case TraceFormat.RecordKind.End:
                    var end = TraceIntervalCodec.DecodeEnd(raw, where);
                    if (end.Intervals != _nextIndex) throw new InvalidDataException($"trace: end record at byte {at} counts {end.Intervals} intervals, the file holds {_nextIndex}");
                    End = end;
                    return null;
                default:
                    throw new InvalidDataException($"trace: unknown record kind {kind} at byte {at} (written by a newer build?)");
            }
        }
    }

    private byte[] Unpack(byte[] stored, byte codec, int rawLen, long at)
    {
        switch ((TraceFormat.Codec)codec)
        {
            case TraceFormat.Codec.None when stored.Length == rawLen: return stored;
            case TraceFormat.Codec.Zstd:
                var raw = new byte[rawLen];
                int n;
                try { n = _zstd.Unwrap(stored, raw, 0); }
                catch (ZstdException e) { throw new InvalidDataException($"trace: record at byte {at} does not decompress ({e.Message})"); }
                if (n != rawLen) throw new InvalidDataException($"trace: record at byte {at} decompresses to {n} bytes, not {rawLen}");
                return raw;
            default: throw new InvalidDataException($"trace: record at byte {at} has unknown codec {codec}");
        }
    }

    /// <summary>Every interval, then the seal in <see cref="End"/>.</summary>
    public IEnumerable<TraceInterval> Intervals()
    {
        while (ReadNext() is { } iv) yield return iv;
    }

    public void Dispose()
    {
        _zstd.Dispose();
        if (!_leaveOpen) _stream.Dispose();
    }

    /// <summary>Counts the header's bytes, so record offsets in errors are true file offsets.</summary>
    private sealed class CountingStream(Stream inner) : Stream
    {
        public long Count;
        public override int Read(byte[] buffer, int offset, int count) { int n = inner.Read(buffer, offset, count); Count += n; return n; }
        public override int Read(Span<byte> buffer) { int n = inner.Read(buffer); Count += n; return n; }
        public override int ReadByte() { int b = inner.ReadByte(); if (b >= 0) Count++; return b; }
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => Count; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}

/// <summary>A whole trace in memory.</summary>
public sealed record TraceFile(TraceHeader Header, IReadOnlyList<TraceInterval> Intervals, TraceEnd End)
{
    public static TraceFile Read(Stream stream)
    {
        using var r = new TraceReader(stream, leaveOpen: true);
        var list = r.Intervals().ToList();
        return new TraceFile(r.Header, list, r.End!);
    }

    public static TraceFile Read(byte[] bytes) => Read(new MemoryStream(bytes, writable: false));

    /// <summary>Reads a file; errors name it.</summary>
    public static TraceFile Load(string path)
    {
        using var f = File.OpenRead(path);
        try { return Read(f); }
        catch (InvalidDataException e) { throw new InvalidDataException($"{path}: {e.Message}"); }
    }
}
