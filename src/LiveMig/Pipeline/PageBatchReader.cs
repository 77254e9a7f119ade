using System.Buffers.Binary;
using LiveMig.Memory;
using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>
/// Destination half of the page path: PageBatch payload → check each entry → decode → place
/// into guest memory. Every field is checked before it is used: page inside memory, encoding
/// known and negotiated, length right for the encoding and inside the frame.
/// </summary>
public sealed class PageBatchReader(GuestMemory memory)
{
    public EncodingCounters Counters { get; } = new();

    /// <summary>Told each page placed (the destination's prefaulter follows it).</summary>
    public Action<long>? Placed { get; set; }

    /// <summary>How pages are decoded; the baseline unless codecs were negotiated.</summary>
    public IPageDecoder Decoder { get; set; } = BasicPageDecoder.Instance;

    /// <summary>When set, every page placed updates its verification hash, read back from guest memory after placing.</summary>
    public PageHashes? Hashes { get; set; }
    /// <summary>When set, every page placed is marked here (pre-copy resume: what arrived of the current round).</summary>
    public Memory.PageBitmap? Delivered { get; set; }
    public long PagesPlaced { get; private set; }

    /// <summary>Places every page of one batch; returns the batch's round.</summary>
    public int Apply(ReadOnlySpan<byte> payload, long frameIndex)
    {
        if (payload.Length < PageBatchWriter.BatchHeaderSize)
            throw new ProtocolException($"PageBatch (frame {frameIndex}): {payload.Length} bytes is shorter than its header");
        int round = (int)BinaryPrimitives.ReadUInt32LittleEndian(payload);
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(payload[4..]);
        int at = PageBatchWriter.BatchHeaderSize;
        for (uint i = 0; i < count; i++)
        {
            if (payload.Length - at < PageBatchWriter.EntryHeaderSize)
                throw new ProtocolException($"PageBatch (frame {frameIndex}): entry {i} of {count} is cut off at byte {at}");
            ReadOnlySpan<byte> e = payload[at..];
            uint page = BinaryPrimitives.ReadUInt32LittleEndian(e);
            var encoding = (PageEncoding)e[4];
            int length = BinaryPrimitives.ReadUInt16LittleEndian(e[6..]);
            if (page >= memory.PageCount)
                throw new ProtocolException($"PageBatch (frame {frameIndex}) entry {i}: page {page} is outside guest memory of {memory.PageCount} pages");
            if (e[5] != 0) throw new ProtocolException($"PageBatch (frame {frameIndex}) entry {i}: reserved byte is {e[5]}");
            at += PageBatchWriter.EntryHeaderSize;
            if (payload.Length - at < length)
                throw new ProtocolException($"PageBatch (frame {frameIndex}) entry {i}: payload of {length} bytes runs past the frame");
            ReadOnlySpan<byte> data = payload.Slice(at, length);
            Span<byte> target = memory.Page(page);
            try { Decoder.Decode(page, encoding, data, target); }
            catch (ProtocolException bad) { throw new ProtocolException($"PageBatch (frame {frameIndex}) entry {i}: {bad.Message}"); }
            if (Hashes is { } h)
            {
                if (encoding == PageEncoding.Zero) h.SetZero(page);
                else h.Set(page, target);
            }
            Placed?.Invoke(page);
            Delivered?.SetUnsynchronized(page);
            Counters.Add(encoding, length);
            PagesPlaced++;
            at += length;
        }
        if (at != payload.Length) throw new ProtocolException($"PageBatch (frame {frameIndex}): {payload.Length - at} trailing bytes after {count} entries");
        return round;
    }
}
