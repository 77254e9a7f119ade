using System.Buffers.Binary;

namespace LiveMig.Protocol;

/// <summary>
/// Protocol version and capabilities. Rule: <see cref="Version"/> goes up by one whenever a
/// frame's layout or a message's meaning changes incompatibly; peers speak
/// min(their maxima) if it is at least both minima, else the destination refuses naming both
/// ranges. Optional features that an older peer can do without are capability bits instead,
/// never a version change: the source asks, the destination answers with what it accepts.
/// </summary>
public static class ProtocolVersion
{
    // 2: the Hello names the VM kind (appended); VM state travels as a sequence of VmState chunks.
    public const ushort Version = 2;
    public const ushort MinSupported = 2;
}

[Flags]
public enum Capabilities : ulong
{
    None = 0,
    /// <summary>Raw pages (always required).</summary>
    Raw = 1UL << 0,
    /// <summary>Zero-page markers (always required).</summary>
    ZeroPages = 1UL << 1,
    /// <summary>LZ4-compressed pages (<c>PageEncoding.Lz4</c>).</summary>
    Lz4 = 1UL << 2,
    /// <summary>Zstandard-compressed pages (<c>PageEncoding.Zstd</c>).</summary>
    Zstd = 1UL << 3,
    /// <summary>XBZRLE deltas against the page the destination holds (<c>PageEncoding.Xbzrle</c>).</summary>
    Xbzrle = 1UL << 4,
    /// <summary>Dedup references (<c>PageEncoding.Dedup</c>) and the DedupQuery/DedupAnswer exchange before round 0.</summary>
    Dedup = 1UL << 5,
    /// <summary>Sync/SyncAck after each live round, so rounds are timed by delivery, not by filling socket buffers.</summary>
    RoundSync = 1UL << 8,
    /// <summary>The source announces its populated extents (an Extents frame) before round 0.</summary>
    Extents = 1UL << 9,
    /// <summary>Page data on several data connections besides the control connection (Streams, StreamAttach, StreamRoundEnd frames).</summary>
    MultiStream = 1UL << 10,
    /// <summary>
    /// A PageBatch frame's checksum is taken over its entries' payload hashes (xxHash3-64 each:
    /// a raw page's is its verification hash), not over the payload: each page is hashed once,
    /// for the frame check and for verification, on both sides (<c>PageBatchCheck.PageHashes</c>).
    /// </summary>
    PageHashCheck = 1UL << 11,
    /// <summary>
    /// PageBatch frames carry no checksum (the field is 0 and not checked): the channel is TLS,
    /// whose record layer authenticates every byte already. Requested only by a source whose
    /// connections are TLS, accepted only by a destination whose connection is (<c>PageBatchCheck.None</c>).
    /// </summary>
    TlsUnchecked = 1UL << 13,
    /// <summary>
    /// Pre-copy resume: after a dropped connection before Prepare, the destination keeps its
    /// partial VM for a while and the source reattaches (Attach, main channel) and continues
    /// with the pages it cannot know were delivered, instead of starting over.
    /// </summary>
    PreCopyResume = 1UL << 12,
    /// <summary>The destination hashes memory before resuming and compares with the source's hash.</summary>
    Verify = 1UL << 16,
    /// <summary>Post-copy: the switch with pages still to come, page requests on a second connection, recovery (docs/protocol.md).</summary>
    PostCopy = 1UL << 24,
    /// <summary>
    /// Pure post-copy: the switch announces the pages that were holes at the source's last scan as
    /// pending too (the pause then asks the dirty log nothing), and the source says after the resume
    /// which of them stayed zero (LateZeros frames; docs/protocol.md, "Zero pages after the resume").
    /// </summary>
    LateZeros = 1UL << 25,
}

/// <summary>
/// Source → destination, first frame. <see cref="VmKind"/> (version 2) comes after the name, so
/// that a version-1 Hello, which ends after the name, still parses (with an empty kind) as far as
/// the version check that refuses it. <see cref="VmSpec"/>, the description a VM of that kind is
/// started from at the destination (a QEMU guest's: machine, memory, vCPUs, boot image; JSON,
/// at most 4 KiB), follows only when there is one: a built-in VM's Hello ends after the kind.
/// </summary>
public readonly record struct HelloMessage(
    ushort MaxVersion, ushort MinVersion, Capabilities Requested, Capabilities Required,
    long MemoryBytes, int PageSize, int Vcpus, Guid MigrationId, string VmName, string VmKind, string VmSpec = "")
{
    public const int MaxNameBytes = 255;
    public const int MaxKindBytes = WireName.MaxBytes;
    public const int MaxSpecBytes = 4096;

    public int Write(Span<byte> into)
    {
        if (KindError(VmKind) is { } bad) throw new ArgumentException(bad, nameof(VmKind));
        var w = new SpanWriter(into);
        w.U16(MaxVersion); w.U16(MinVersion);
        w.U64((ulong)Requested); w.U64((ulong)Required);
        w.I64(MemoryBytes); w.U32((uint)PageSize); w.U32((uint)Vcpus);
        MigrationId.TryWriteBytes(w.Remaining); w.Advance(16);
        w.String(VmName, MaxNameBytes);
        WireName.Write(ref w, VmKind, "VM kind");
        if (!string.IsNullOrEmpty(VmSpec))
        {
            if (System.Text.Encoding.UTF8.GetByteCount(VmSpec) > MaxSpecBytes) throw new ArgumentException($"VM description is longer than {MaxSpecBytes} bytes", nameof(VmSpec));
            w.String(VmSpec, MaxSpecBytes);
        }
        return w.Position;
    }

    public static HelloMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "Hello");
        var m = new HelloMessage(r.U16("maxVersion"), r.U16("minVersion"), (Capabilities)r.U64("requested"), (Capabilities)r.U64("required"),
            r.I64("memoryBytes"), (int)r.U32("pageSize"), (int)r.U32("vcpus"), new Guid(r.Bytes(16, "migrationId")), r.String("vmName", MaxNameBytes), "");
        if (r.Remaining == 0) return m; // a version-1 Hello: the version check refuses it
        string kind = WireName.Read(ref r, "Hello", "vmKind", allowEmpty: false);
        string spec = r.Remaining > 0 ? r.String("vmSpec", MaxSpecBytes) : "";
        r.End();
        return m with { VmKind = kind, VmSpec = spec };
    }

    /// <summary>Why <paramref name="kind"/> cannot name a VM kind, or null.</summary>
    public static string? KindError(string? kind) => WireName.Error(kind, allowEmpty: false) is { } why ? $"VM kind '{kind}' is not valid: {why}" : null;
}

/// <summary>
/// A short ASCII name on the wire (a VM kind, a stop reason): u16 length | 0..32 bytes of ASCII
/// letters, digits, '.', '_' or '-'. A bad name is refused naming the offending byte's position
/// and value, never echoing it (it comes from the peer).
/// </summary>
public static class WireName
{
    public const int MaxBytes = 32;
    private const string Rule = "1..32 ASCII letters, digits, '.', '_' or '-'";

    private static bool IsNameChar(int c) => c is (>= 'a' and <= 'z') or (>= 'A' and <= 'Z') or (>= '0' and <= '9') or '.' or '_' or '-';

    /// <summary>Why <paramref name="name"/> cannot go on the wire, or null.</summary>
    public static string? Error(string? name, bool allowEmpty) =>
        name is null || name.Length > MaxBytes || (name.Length == 0 && !allowEmpty) || !name.All(c => IsNameChar(c)) ? $"a name is {(allowEmpty ? "0" : "1")}..32 ASCII letters, digits, '.', '_' or '-'" : null;

    public static void Write(ref SpanWriter w, string name, string field)
    {
        if (Error(name, allowEmpty: true) is { } why) throw new ArgumentException($"{field} '{name}': {why}", nameof(name));
        w.String(name, MaxBytes);
    }

    public static string Read(ref SpanReader r, string message, string field, bool allowEmpty)
    {
        int n = r.U16(field + ".length");
        if (n > MaxBytes || (n == 0 && !allowEmpty)) throw new ProtocolException($"{message}: {field} is {n} bytes; {Explain(field)}");
        var bytes = r.Bytes(n, field);
        for (int i = 0; i < bytes.Length; i++)
            if (!IsNameChar(bytes[i])) throw new ProtocolException($"{message}: {field} byte {i} is 0x{bytes[i]:x2}; {Explain(field)}");
        return System.Text.Encoding.ASCII.GetString(bytes);
    }

    private static string Explain(string field) => field == "vmKind" ? "a VM kind is " + Rule : $"a {field} is 0..32 ASCII letters, digits, '.', '_' or '-'";
}

/// <summary>Destination → source: the version it will speak and the capabilities it accepts.</summary>
public readonly record struct HelloAckMessage(ushort Version, Capabilities Accepted)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U16(Version); w.U64((ulong)Accepted); return w.Position; }

    public static HelloAckMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "HelloAck");
        var m = new HelloAckMessage(r.U16("version"), (Capabilities)r.U64("accepted"));
        r.End();
        return m;
    }

    /// <summary>
    /// Why a source must refuse this answer to <paramref name="offered"/>, or null: a destination
    /// may only choose among what the Hello offered — a version in its range, capabilities it
    /// requested. Anything else is a peer that does not follow the negotiation.
    /// </summary>
    public string? Overreach(HelloMessage offered)
    {
        if (Version < offered.MinVersion || Version > offered.MaxVersion)
            return $"destination chose protocol version {Version}, this source offered {offered.MinVersion}..{offered.MaxVersion}";
        var extra = Accepted & ~offered.Requested;
        return extra != 0 ? $"destination's HelloAck grants capabilities this source never offered: {extra}" : null;
    }
}

/// <summary>Source → destination: a round begins; <see cref="Final"/> means the source VM is now paused (stop-and-copy).</summary>
public readonly record struct RoundStartMessage(int Round, bool Final)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U32((uint)Round); w.U8(Final ? (byte)1 : (byte)0); return w.Position; }

    public static RoundStartMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "RoundStart");
        var m = new RoundStartMessage((int)r.U32("round"), r.U8("final") switch { 0 => false, 1 => true, var b => throw new ProtocolException($"RoundStart: final flag {b} is not 0 or 1") });
        r.End();
        return m;
    }
}

/// <summary>Source → destination: the round's figures, so the destination's report has them too.</summary>
public readonly record struct RoundEndMessage(int Round, long PagesSent, long PagesDirtied, long BytesSent, long DurationUs)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        w.U32((uint)Round); w.I64(PagesSent); w.I64(PagesDirtied); w.I64(BytesSent); w.I64(DurationUs);
        return w.Position;
    }

    public static RoundEndMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "RoundEnd");
        var m = new RoundEndMessage((int)r.U32("round"), r.I64("pagesSent"), r.I64("pagesDirtied"), r.I64("bytesSent"), r.I64("durationUs"));
        r.End();
        if (m.PagesSent < 0 || m.PagesDirtied < 0 || m.BytesSent < 0 || m.DurationUs < 0) throw new ProtocolException("RoundEnd: negative figure");
        return m;
    }
}

/// <summary>
/// Source → destination after the last pages and the VM state: switch-over step 1. Version 2
/// adds what only the source knows but the destination reports too: why it stopped
/// (<see cref="StopReason"/>, e.g. <c>downtime-target</c>) and the pages it did not send because
/// the guest reported them free.
/// </summary>
public readonly record struct PrepareMessage(bool Verify, ulong SourceHash, long TotalPagesSent, string StopReason = "", long FreePagesSkipped = 0)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        w.U8(Verify ? (byte)1 : (byte)0); w.U64(SourceHash); w.I64(TotalPagesSent); w.I64(FreePagesSkipped);
        WireName.Write(ref w, StopReason, "stop reason");
        return w.Position;
    }

    public static PrepareMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "Prepare");
        var m = new PrepareMessage(r.U8("verify") != 0, r.U64("sourceHash"), r.I64("totalPagesSent"));
        m = m with { FreePagesSkipped = r.I64("freePagesSkipped"), StopReason = WireName.Read(ref r, "Prepare", "stopReason", allowEmpty: true) };
        r.End();
        if (m.FreePagesSkipped < 0) throw new ProtocolException($"Prepare: negative free-page count {m.FreePagesSkipped}");
        return m;
    }
}

/// <summary>Destination → source: memory verified (or verification off) and VM loaded, paused, ready to run.</summary>
public readonly record struct ReadyMessage(ulong DestinationHash, long VerifyUs)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U64(DestinationHash); w.I64(VerifyUs); return w.Position; }

    public static ReadyMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "Ready");
        var m = new ReadyMessage(r.U64("destinationHash"), r.I64("verifyUs"));
        r.End();
        return m;
    }
}

/// <summary>Either direction: the sender gives up; the message says why.</summary>
public readonly record struct ErrorMessage(ushort Code, string Text)
{
    public const ushort Refused = 1, VerificationFailed = 2, BadStream = 3, Internal = 4, Cancelled = 5;

    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U16(Code); w.String(Text, 4000); return w.Position; }

    public static ErrorMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "Error");
        // The text is the peer's: it is only ever shown, so it is escaped here, once, for every place it goes.
        var m = new ErrorMessage(r.U16("code"), PeerText.Escape(r.String("text", 4000)));
        r.End();
        return m;
    }
}

/// <summary>Sync (S→D) and SyncAck (D→S): the round being synchronised.</summary>
public readonly record struct SyncMessage(int Round)
{
    /// <summary>The round of pure post-copy's preamble Sync, sent before any round (docs/protocol.md, "Post-copy").</summary>
    public const int BeforeRounds = -1;

    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U32((uint)Round); return w.Position; }

    public static SyncMessage Parse(ReadOnlySpan<byte> payload, string what)
    {
        var r = new SpanReader(payload, what);
        var m = new SyncMessage((int)r.U32("round"));
        r.End();
        return m;
    }
}

/// <summary>Extents (S→D): populated page ranges, (u32 first, u32 count) each, ascending, non-overlapping, inside memory.</summary>
public static class ExtentsMessage
{
    public const int MaxExtents = (2 << 20) / 8;

    public static int Write(Span<byte> into, IReadOnlyList<(long First, long Count)> extents)
    {
        var w = new SpanWriter(into);
        for (int i = 0; i < extents.Count && i < MaxExtents; i++) { w.U32((uint)extents[i].First); w.U32((uint)extents[i].Count); }
        return w.Position;
    }

    public static (long First, long Count)[] Parse(ReadOnlySpan<byte> payload, long pageCount)
    {
        if (payload.Length % 8 != 0) throw new ProtocolException($"Extents: {payload.Length} bytes is not a whole number of extents");
        var r = new SpanReader(payload, "Extents");
        var list = new (long, long)[payload.Length / 8];
        long end = 0;
        for (int i = 0; i < list.Length; i++)
        {
            long first = r.U32("first"), count = r.U32("count");
            if (first < end || count == 0 || first + count > pageCount)
                throw new ProtocolException($"Extents: extent {i} ({first}+{count}) overlaps, is empty, or leaves memory of {pageCount} pages");
            list[i] = (first, count);
            end = first + count;
        }
        return list;
    }
}

/// <summary>
/// D→S, pre-copy resume: u32 round | u64 first page (a multiple of 64) | u32 words | words × u64,
/// the bitmap of pages placed in <c>round</c> (the round the drop cut short), in chunks that fit
/// a small frame; then Attached.
/// </summary>
public static class DeliveredMessage
{
    public const int MaxWords = 7680;
    private const int HeaderSize = 16;

    public static void Send(FrameWriter frames, int round, Memory.PageBitmap delivered)
    {
        for (long first = 0; first < delivered.WordCount; first += MaxWords)
        {
            int n = (int)Math.Min(MaxWords, delivered.WordCount - first);
            Span<byte> p = frames.Begin(FrameType.Delivered, HeaderSize + n * 8);
            BinaryPrimitives.WriteUInt32LittleEndian(p, (uint)round);
            BinaryPrimitives.WriteUInt64LittleEndian(p[4..], (ulong)(first * 64));
            BinaryPrimitives.WriteUInt32LittleEndian(p[12..], (uint)n);
            for (int i = 0; i < n; i++) BinaryPrimitives.WriteUInt64LittleEndian(p[(HeaderSize + i * 8)..], delivered.Word(first + i));
            frames.Commit(HeaderSize + n * 8);
        }
    }

    /// <summary>Applies one chunk to <paramref name="into"/>; returns its round. Checks bounds and alignment.</summary>
    public static int Apply(ReadOnlySpan<byte> payload, Memory.PageBitmap into)
    {
        if (payload.Length < HeaderSize) throw new ProtocolException($"Delivered: {payload.Length} bytes is shorter than its header");
        int round = (int)BinaryPrimitives.ReadUInt32LittleEndian(payload);
        ulong first = BinaryPrimitives.ReadUInt64LittleEndian(payload[4..]);
        uint n = BinaryPrimitives.ReadUInt32LittleEndian(payload[12..]);
        if (round < 0) throw new ProtocolException($"Delivered: round {(uint)round} out of range");
        if (first % 64 != 0) throw new ProtocolException($"Delivered: first page {first} is not a multiple of 64");
        if (n > MaxWords || payload.Length != HeaderSize + n * 8) throw new ProtocolException($"Delivered: {n} words do not match a payload of {payload.Length} bytes");
        ulong firstWord = first / 64;
        if (firstWord + n > (ulong)into.WordCount) throw new ProtocolException($"Delivered: words {firstWord}..{firstWord + n} run past memory of {into.PageCount} pages");
        for (int i = 0; i < n; i++) into.SetWord((long)firstWord + i, BinaryPrimitives.ReadUInt64LittleEndian(payload[(HeaderSize + i * 8)..]));
        return round;
    }
}
