using System.Buffers.Binary;
using System.IO.Hashing;
using LiveMig.Memory;
using LiveMig.Protocol;

namespace LiveMig.Pipeline;

/// <summary>
/// Source half of the page path: page in guest memory → encode → into the open PageBatch frame
/// → send when full. Pages are encoded straight into the frame writer's buffer, so a page is
/// copied exactly once (guest memory → socket buffer). Under <see cref="PageBatchCheck.PageHashes"/>
/// each entry's payload is hashed once, right after it was written (cache-hot), and that hash
/// serves both the frame's checksum and, for a raw page, its verification hash.
/// <code>
/// PageBatch payload: u32 round | u32 count | count × entry
/// entry:             u32 page  | u8 encoding | u8 reserved (0) | u16 length | length bytes
/// </code>
/// </summary>
public sealed class PageBatchWriter(FrameWriter frames, GuestMemory memory)
{
    private FrameWriter frames = frames;

    public const int BatchHeaderSize = 8;
    public const int EntryHeaderSize = 8;
    /// <summary>A batch is sent once it holds this much (1 MiB: large writes, bounded latency).</summary>
    public const int TargetBatchBytes = 1 << 20;
    private const int FrameCapacity = TargetBatchBytes + BatchHeaderSize + EntryHeaderSize + GuestMemory.PageSize;

    private int _used;
    private int _count;
    private int _round;

    public EncodingCounters Counters { get; } = new();

    /// <summary>How pages are encoded; the baseline (zero or raw) unless codecs were negotiated.</summary>
    public IPageEncoder Encoder { get; set; } = BasicPageEncoder.Instance;

    /// <summary>When set, every page sent updates its verification hash (hashed from the copy that was sent).</summary>
    public PageHashes? Hashes { get; set; }

    /// <summary>When set, each batch sent tells it how fast the socket took the bytes (for the adaptive stage).</summary>
    public LinkEstimate? Link { get; set; }

    /// <summary>PageBatch entries written so far (pages sent, whatever their encoding).</summary>
    public long EntriesWritten { get; private set; }

    private long _linkBytes, _linkTicks;
    private PageBatchCheck _check;
    private XxHash3? _digest;

    /// <summary>How the frames' checksums are made (negotiated: <see cref="PageBatchChecks.Of"/>); set before the first page.</summary>
    public PageBatchCheck Check
    {
        get => _check;
        set
        {
            if (frames.IsOpen) throw new InvalidOperationException("the check changes between frames only");
            _check = value;
            if (value == PageBatchCheck.PageHashes) _digest ??= new XxHash3(FrameFormat.Seed(FrameType.PageBatch));
        }
    }

    /// <summary>Continues on another connection (a migration that reattached); a batch left open on the old one is dropped.</summary>
    public void Rebind(FrameWriter next)
    {
        if (frames.IsOpen) frames.Abandon();
        frames = next;
        _used = _count = 0;
        _digest?.Reset();
        _linkBytes = next.BytesWritten;
        _linkTicks = next.WriteTicks;
    }

    public void BeginRound(int round)
    {
        _round = round;
        Encoder.BeginRound(round);
    }

    /// <summary>
    /// Encodes one page and queues it. <paramref name="skipZero"/> drops zero pages entirely
    /// (round 0: the destination's memory starts zero); they are still counted as zero pages.
    /// Returns false when the page was skipped. <paramref name="again"/>: a page sent before that
    /// the destination places only once (post-copy's answer to a request for a pushed page) — its
    /// bytes count, the page does not count twice.
    /// </summary>
    public bool Add(long page, bool skipZero, bool again = false)
    {
        ReadOnlySpan<byte> data = memory.Page(page);
        if (skipZero && PageCodec.IsZero(data)) { Counters.Add(PageEncoding.Zero, 0); return false; }
        if (!frames.IsOpen) Open();
        Span<byte> entry = frames.OpenPayload[_used..];
        Span<byte> payload = entry.Slice(EntryHeaderSize, PageCodec.MaxEncodedSize);
        PageEncoding encoding = Encoder.Encode(page, data, payload, out int written);
        BinaryPrimitives.WriteUInt32LittleEndian(entry, (uint)page);
        entry[4] = (byte)encoding;
        entry[5] = 0;
        BinaryPrimitives.WriteUInt16LittleEndian(entry[6..], (ushort)written);
        ulong payloadHash = _check == PageBatchCheck.PageHashes ? Digest(entry, payload[..written]) : 0;
        if (Hashes is { } h)
        {
            // A raw page is hashed from the copy that was sent (under PageHashes that hash is the
            // one just taken); others from the encoder's copy when it kept one, else from guest
            // memory (a write racing this read dirties the page again, so it is re-sent later).
            if (encoding == PageEncoding.Zero) h.SetZero(page);
            else if (encoding != PageEncoding.Raw) { if (Encoder.TryGetContentHash(out ulong content)) h.SetHash(page, content); else h.Set(page, data); }
            else if (_check == PageBatchCheck.PageHashes) h.SetHash(page, payloadHash);
            else h.Set(page, payload[..written]);
        }
        _used += EntryHeaderSize + written;
        if (again) Counters.AddBytes(encoding, written);
        else Counters.Add(encoding, written);
        _count++;
        EntriesWritten++;
        if (_used >= TargetBatchBytes) Flush();
        return true;
    }

    /// <summary>Hashes an entry's payload and adds (entry header, hash) to the frame's digest; returns the hash.</summary>
    private ulong Digest(ReadOnlySpan<byte> entry, ReadOnlySpan<byte> payload)
    {
        ulong hash = XxHash3.HashToUInt64(payload);
        Span<byte> record = stackalloc byte[16];
        entry[..EntryHeaderSize].CopyTo(record);
        BinaryPrimitives.WriteUInt64LittleEndian(record[8..], hash);
        _digest!.Append(record);
        return hash;
    }

    private void Open()
    {
        frames.Begin(FrameType.PageBatch, FrameCapacity);
        _used = BatchHeaderSize;
        _count = 0;
        _digest?.Reset();
    }

    /// <summary>The open frame's checksum field under the negotiated check (null: the payload's hash, taken by the frame writer).</summary>
    private uint? Checksum(ReadOnlySpan<byte> batchHeader)
    {
        switch (_check)
        {
            case PageBatchCheck.None: return 0;
            case PageBatchCheck.PageHashes:
                _digest!.Append(batchHeader);
                return (uint)_digest.GetCurrentHashAsUInt64();
            default: return null;
        }
    }

    /// <summary>Sends the open batch, if any.</summary>
    public void Flush()
    {
        if (!frames.IsOpen) return;
        Span<byte> p = frames.OpenPayload;
        BinaryPrimitives.WriteUInt32LittleEndian(p, (uint)_round);
        BinaryPrimitives.WriteUInt32LittleEndian(p[4..], (uint)_count);
        frames.Commit(_used, Checksum(p[..BatchHeaderSize]));
        _count = 0;
        if (Link is { } link)
        {
            link.Observe(frames.BytesWritten - _linkBytes, frames.WriteTicks - _linkTicks, frames.Time.TimestampFrequency);
            _linkBytes = frames.BytesWritten;
            _linkTicks = frames.WriteTicks;
        }
    }
}
