using System.Buffers.Binary;
using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>One entry of a PageBatch: the page, its encoding and the encoded bytes (valid while the payload is).</summary>
public readonly ref struct PageBatchEntry(uint index, long page, PageEncoding encoding, ReadOnlySpan<byte> data)
{
    public uint Index { get; } = index;
    public long Page { get; } = page;
    public PageEncoding Encoding { get; } = encoding;
    public ReadOnlySpan<byte> Data { get; } = data;
}

/// <summary>
/// Walks the entries of one PageBatch payload (layout: <see cref="PageBatchWriter"/>), checking
/// each against the frame and the guest's size before the caller touches memory; the one parser
/// of the layout for every destination path (pre-copy, post-copy push and answers, data streams).
/// No allocation: a ref struct over the payload.
/// </summary>
public ref struct PageBatchEntries
{
    private readonly ReadOnlySpan<byte> _payload;
    private readonly long _frameIndex;
    private readonly long _pageCount;
    private int _at;
    private uint _next;

    public PageBatchEntries(ReadOnlySpan<byte> payload, long frameIndex, long pageCount)
    {
        if (payload.Length < PageBatchWriter.BatchHeaderSize)
            throw new ProtocolException($"PageBatch (frame {frameIndex}): {payload.Length} bytes is shorter than its header");
        _payload = payload;
        _frameIndex = frameIndex;
        _pageCount = pageCount;
        Round = (int)BinaryPrimitives.ReadUInt32LittleEndian(payload);
        Count = BinaryPrimitives.ReadUInt32LittleEndian(payload[4..]);
        _at = PageBatchWriter.BatchHeaderSize;
    }

    public int Round { get; }
    public uint Count { get; }

    /// <summary>The next entry; false after the last, once the payload is checked to hold nothing more.</summary>
    public bool MoveNext(out PageBatchEntry entry)
    {
        if (_next == Count)
        {
            if (_at != _payload.Length) throw new ProtocolException($"PageBatch (frame {_frameIndex}): {_payload.Length - _at} trailing bytes after {Count} entries");
            entry = default;
            return false;
        }
        uint i = _next++;
        if (_payload.Length - _at < PageBatchWriter.EntryHeaderSize)
            throw new ProtocolException($"PageBatch (frame {_frameIndex}): entry {i} of {Count} is cut off at byte {_at}");
        ReadOnlySpan<byte> e = _payload[_at..];
        uint page = BinaryPrimitives.ReadUInt32LittleEndian(e);
        int length = BinaryPrimitives.ReadUInt16LittleEndian(e[6..]);
        if (page >= _pageCount) throw new ProtocolException($"PageBatch (frame {_frameIndex}) entry {i}: page {page} is outside guest memory of {_pageCount} pages");
        if (e[5] != 0) throw new ProtocolException($"PageBatch (frame {_frameIndex}) entry {i}: reserved byte is {e[5]}");
        _at += PageBatchWriter.EntryHeaderSize;
        if (_payload.Length - _at < length) throw new ProtocolException($"PageBatch (frame {_frameIndex}) entry {i}: payload of {length} bytes runs past the frame");
        entry = new PageBatchEntry(i, page, (PageEncoding)e[4], _payload.Slice(_at, length));
        _at += length;
        return true;
    }

    /// <summary>A decoder's complaint about an entry, with the frame and entry it came from.</summary>
    public readonly ProtocolException AtEntry(in PageBatchEntry entry, ProtocolException bad) =>
        new($"PageBatch (frame {_frameIndex}) entry {entry.Index}: {bad.Message}");
}
