using System.Buffers.Binary;
using LiveMig.Memory;

namespace LiveMig.Protocol;

/// <summary>Which connection of a migration an <see cref="AttachMessage"/> opens.</summary>
public enum ChannelKind : byte
{
    /// <summary>The main connection, reopened after a failure during post-copy (recovery).</summary>
    Main = 1,
    /// <summary>The page-request connection: requests D→S, requested pages S→D, nothing else.</summary>
    Priority = 2,
}

/// <summary>
/// S→D on main: the source VM is paused; <see cref="PendingPages"/> pages are still to come
/// (listed next). Version 2 adds why the source switched (<see cref="Reason"/>, e.g. <c>round-budget</c>)
/// and how many pages the guest reported free and the source never sent (<see cref="FreePagesSkipped"/>; they stay zero).
/// </summary>
public readonly record struct PostCopyStartMessage(int Round, long PendingPages, string Reason = "", long FreePagesSkipped = 0)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        w.U32((uint)Round); w.I64(PendingPages); w.I64(FreePagesSkipped);
        WireName.Write(ref w, Reason, "switch reason");
        return w.Position;
    }

    public static PostCopyStartMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "PostCopyStart");
        var m = new PostCopyStartMessage((int)r.U32("round"), r.I64("pendingPages"));
        m = m with { FreePagesSkipped = r.I64("freePagesSkipped"), Reason = WireName.Read(ref r, "PostCopyStart", "reason", allowEmpty: true) };
        r.End();
        if (m.PendingPages < 0) throw new ProtocolException("PostCopyStart: negative page count");
        if (m.FreePagesSkipped < 0) throw new ProtocolException($"PostCopyStart: negative free-page count {m.FreePagesSkipped}");
        return m;
    }
}

/// <summary>
/// A slice of a page bitmap: u64 first page (a multiple of 64) | u32 word count | words (u64 each).
/// S→D at the switch: the pages still to come. D→S on a reopened main connection: the pages the
/// destination has (the source sends what is missing).
/// </summary>
public static class PageBitmapChunks
{
    /// <summary>Words per frame: 7,680 words = 60 KiB, under the 64 KiB limit of small frames.</summary>
    public const int MaxWords = 7680;

    public static void Send(FrameWriter frames, NativePageBitmap bitmap, FrameType type = FrameType.PendingPages)
    {
        for (long first = 0; first < bitmap.WordCount; first += MaxWords)
        {
            int n = (int)Math.Min(MaxWords, bitmap.WordCount - first);
            Span<byte> p = frames.Begin(type, 12 + n * 8);
            BinaryPrimitives.WriteUInt64LittleEndian(p, (ulong)(first * 64));
            BinaryPrimitives.WriteUInt32LittleEndian(p[8..], (uint)n);
            for (int i = 0; i < n; i++) BinaryPrimitives.WriteUInt64LittleEndian(p[(12 + i * 8)..], bitmap.Word(first + i));
            frames.Commit(12 + n * 8);
        }
    }

    /// <summary>Applies one chunk; returns the words covered. Checks bounds and alignment.</summary>
    public static int Apply(ReadOnlySpan<byte> payload, NativePageBitmap into)
    {
        var words = Words(payload, into.WordCount, into.PageCount, out long firstWord);
        for (int i = 0; i < words.Length / 8; i++) into.SetWord(firstWord + i, BinaryPrimitives.ReadUInt64LittleEndian(words[(i * 8)..]));
        return words.Length / 8;
    }

    /// <summary>One chunk's words (8 bytes each, little-endian) and the index of the first, checked against a bitmap of <paramref name="wordCount"/> words.</summary>
    public static ReadOnlySpan<byte> Words(ReadOnlySpan<byte> payload, long wordCount, long pageCount, out long firstWord)
    {
        if (payload.Length < 12) throw new ProtocolException($"PendingPages: {payload.Length} bytes is shorter than its header");
        ulong first = BinaryPrimitives.ReadUInt64LittleEndian(payload);
        uint n = BinaryPrimitives.ReadUInt32LittleEndian(payload[8..]);
        if (first % 64 != 0) throw new ProtocolException($"PendingPages: first page {first} is not a multiple of 64");
        if (n > MaxWords || payload.Length != 12 + n * 8) throw new ProtocolException($"PendingPages: {n} words do not match a payload of {payload.Length} bytes");
        ulong fw = first / 64;
        if (fw + n > (ulong)wordCount) throw new ProtocolException($"PendingPages: words {fw}..{fw + n} run past memory of {pageCount} pages");
        firstWord = (long)fw;
        return payload.Slice(12, (int)n * 8);
    }
}

/// <summary>D→S on the priority connection: u32 count | count × u32 page.</summary>
public static class PageRequestMessage
{
    public const int MaxPages = 4096;

    public static int Write(Span<byte> into, ReadOnlySpan<long> pages)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(into, (uint)pages.Length);
        for (int i = 0; i < pages.Length; i++) BinaryPrimitives.WriteUInt32LittleEndian(into[(4 + i * 4)..], (uint)pages[i]);
        return 4 + pages.Length * 4;
    }

    /// <summary>Parses and checks every page against the memory size.</summary>
    public static int Parse(ReadOnlySpan<byte> payload, long pageCount, Span<long> into)
    {
        if (payload.Length < 4) throw new ProtocolException("PageRequest: shorter than its header");
        uint n = BinaryPrimitives.ReadUInt32LittleEndian(payload);
        if (n == 0 || n > MaxPages || payload.Length != 4 + n * 4) throw new ProtocolException($"PageRequest: {n} pages do not match a payload of {payload.Length} bytes");
        for (int i = 0; i < n; i++)
        {
            uint p = BinaryPrimitives.ReadUInt32LittleEndian(payload[(4 + i * 4)..]);
            if (p >= pageCount) throw new ProtocolException($"PageRequest: page {p} is outside guest memory of {pageCount} pages");
            into[i] = p;
        }
        return (int)n;
    }
}

/// <summary>S→D on main: every page has been sent. Carries the source's hash of its paused memory.</summary>
public readonly record struct PostCopyEndMessage(bool Verify, ulong SourceHash, long PagesPushed, long PagesRequested)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        w.U8(Verify ? (byte)1 : (byte)0); w.U64(SourceHash); w.I64(PagesPushed); w.I64(PagesRequested);
        return w.Position;
    }

    public static PostCopyEndMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "PostCopyEnd");
        var m = new PostCopyEndMessage(r.U8("verify") != 0, r.U64("sourceHash"), r.I64("pagesPushed"), r.I64("pagesRequested"));
        r.End();
        return m;
    }
}

/// <summary>D→S on main: every page is here. The hash of the pages as they were placed, and what the vCPUs saw.</summary>
public readonly record struct PostCopyDoneMessage(ulong DestinationHash, long Faults, long P50Ns, long P99Ns, long MaxNs, long NetworkFaults)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        w.U64(DestinationHash); w.I64(Faults); w.I64(P50Ns); w.I64(P99Ns); w.I64(MaxNs); w.I64(NetworkFaults);
        return w.Position;
    }

    public static PostCopyDoneMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "PostCopyDone");
        var m = new PostCopyDoneMessage(r.U64("destinationHash"), r.I64("faults"), r.I64("p50Ns"), r.I64("p99Ns"), r.I64("maxNs"), r.I64("networkFaults"));
        r.End();
        return m;
    }
}

/// <summary>S→D, first frame of a second connection: which migration and which channel.</summary>
public readonly record struct AttachMessage(Guid MigrationId, ChannelKind Channel)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        MigrationId.TryWriteBytes(w.Remaining); w.Advance(16);
        w.U8((byte)Channel);
        return w.Position;
    }

    public static AttachMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "Attach");
        var m = new AttachMessage(new Guid(r.Bytes(16, "migrationId")), (ChannelKind)r.U8("channel"));
        r.End();
        if (m.Channel is not (ChannelKind.Main or ChannelKind.Priority)) throw new ProtocolException($"Attach: unknown channel {(byte)m.Channel}");
        return m;
    }
}

/// <summary>D→S: the channel is attached (on a reopened main connection, after the present-pages bitmap).</summary>
public readonly record struct AttachedMessage(ChannelKind Channel, bool Resumed)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U8((byte)Channel); w.U8(Resumed ? (byte)1 : (byte)0); return w.Position; }

    public static AttachedMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "Attached");
        var m = new AttachedMessage((ChannelKind)r.U8("channel"), r.U8("resumed") != 0);
        r.End();
        return m;
    }
}
