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

    /// <summary>
    /// Places every page of one batch; returns the batch's round. <paramref name="entryHashes"/>:
    /// the frame check's hash of each entry's payload (<see cref="FrameReader.EntryHashes"/>),
    /// when it took them: a raw page placed is exactly its payload, so its verification hash is
    /// that one and the page is not read again.
    /// </summary>
    public int Apply(ReadOnlySpan<byte> payload, long frameIndex, ReadOnlySpan<ulong> entryHashes = default)
    {
        var entries = new PageBatchEntries(payload, frameIndex, memory.PageCount);
        while (entries.MoveNext(out var entry))
        {
            long page = entry.Page;
            Span<byte> target = memory.Page(page);
            try { Decoder.Decode(page, entry.Encoding, entry.Data, target); }
            catch (ProtocolException bad) { throw entries.AtEntry(entry, bad); }
            if (Hashes is { } h)
            {
                if (entry.Encoding == PageEncoding.Zero) h.SetZero(page);
                else if (entry.Encoding == PageEncoding.Raw && entry.Index < (uint)entryHashes.Length) h.SetHash(page, entryHashes[(int)entry.Index]);
                else h.Set(page, target);
            }
            Placed?.Invoke(page);
            Delivered?.SetUnsynchronized(page);
            Counters.Add(entry.Encoding, entry.Data.Length);
            PagesPlaced++;
        }
        return entries.Round;
    }
}
