using System.Buffers.Binary;
using ZstdSharp;

namespace LiveMig.Traces;

/// <summary>
/// Writes a trace: the header at once, one record per interval, and the seal. Made with
/// <see cref="Create"/>, it writes to <c>FILE.partial</c> and renames it to FILE only in
/// <see cref="Seal"/>; disposed unsealed, it deletes the partial file. So a file by the asked
/// name is always a complete trace.
/// </summary>
public sealed class TraceWriter : IDisposable
{
    public const string PartialSuffix = ".partial";

    private readonly Stream _stream;
    private readonly bool _ownsStream;
    private readonly string? _tempPath, _finalPath;
    private readonly Compressor _zstd = new(3);
    private int _intervals, _pageSpace;
    private TimeSpan _end;
    private bool _sealed;

    public TraceWriter(Stream stream, TraceHeader header, bool leaveOpen = true)
    {
        _stream = stream;
        _ownsStream = !leaveOpen;
        _stream.Write(TraceHeaderCodec.Encode(header));
    }

    private TraceWriter(FileStream file, TraceHeader header, string tempPath, string finalPath) : this(file, header, leaveOpen: false)
    {
        _tempPath = tempPath;
        _finalPath = finalPath;
    }

    /// <summary>Starts a trace that becomes <paramref name="path"/> when sealed.</summary>
    public static TraceWriter Create(string path, TraceHeader header)
    {
        string full = Path.GetFullPath(path);
        string temp = full + PartialSuffix;
        var file = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 16);
        try { return new TraceWriter(file, header, temp, full); }
        catch { file.Dispose(); File.Delete(temp); throw; }
    }

    /// <summary>Bytes written so far (header and records).</summary>
    public long Length => _stream.Position;

    public int Intervals => _intervals;

    public void Write(TraceInterval interval)
    {
        if (_sealed) throw new InvalidOperationException("trace already sealed");
        if (interval.Index != _intervals) throw new ArgumentException($"interval {interval.Index} written as number {_intervals}");
        WriteRecord(TraceFormat.RecordKind.Interval, TraceIntervalCodec.Encode(interval));
        _intervals++;
        _pageSpace = Math.Max(_pageSpace, interval.PageSpace);
        _end = interval.Start + interval.Duration;
    }

    /// <summary>Writes the end record, flushes to disk, and (for a file) gives it its real name.</summary>
    public void Seal(TraceEndReason reason, string note = "")
    {
        if (_sealed) throw new InvalidOperationException("trace already sealed");
        WriteRecord(TraceFormat.RecordKind.End, TraceIntervalCodec.EncodeEnd(new TraceEnd { Intervals = _intervals, PageSpace = _pageSpace, Duration = _end, Reason = reason, Note = note }));
        _stream.Flush();
        if (_stream is FileStream fs) fs.Flush(flushToDisk: true);
        _sealed = true;
        if (_tempPath is null) return;
        _stream.Dispose();
        File.Move(_tempPath, _finalPath!, overwrite: true);
    }

    private void WriteRecord(TraceFormat.RecordKind kind, byte[] raw)
    {
        var stored = _zstd.Wrap(raw);
        var codec = TraceFormat.Codec.Zstd;
        if (stored.Length >= raw.Length) { stored = raw; codec = TraceFormat.Codec.None; }
        if (stored.Length > TraceFormat.MaxRecordBytes) throw new InvalidOperationException($"trace record of {stored.Length} bytes exceeds the format's {TraceFormat.MaxRecordBytes}");
        Span<byte> head = stackalloc byte[TraceFormat.RecordHeaderSize];
        head[0] = (byte)kind;
        head[1] = (byte)codec;
        BinaryPrimitives.WriteUInt32LittleEndian(head[2..], (uint)stored.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(head[6..], (uint)raw.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(head[10..], TraceFormat.Checksum(stored));
        _stream.Write(head);
        _stream.Write(stored);
    }

    public void Dispose()
    {
        _zstd.Dispose();
        if (_ownsStream || _tempPath is not null) _stream.Dispose();
        if (!_sealed && _tempPath is not null) File.Delete(_tempPath);
    }
}
