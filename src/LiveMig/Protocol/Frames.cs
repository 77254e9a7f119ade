using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using System.IO.Hashing;
using System.Runtime.ExceptionServices;

namespace LiveMig.Protocol;

/// <summary>Frame kinds. The numbers are part of the wire format: never reuse one.</summary>
public enum FrameType : byte
{
    Hello = 1,
    HelloAck = 2,
    RoundStart = 3,
    PageBatch = 4,
    RoundEnd = 5,
    VmState = 6,
    Prepare = 7,
    Ready = 8,
    Commit = 9,
    Resumed = 10,
    Error = 11,
    /// <summary>Source → destination before round 0 (capability Dedup): "do you hold these contents?"</summary>
    DedupQuery = 12,
    /// <summary>Destination → source: which of the queried pages it filled from content it already held.</summary>
    DedupAnswer = 13,
    /// <summary>S→D after a live round's pages: "tell me when you have all of them".</summary>
    Sync = 14,
    /// <summary>D→S: every frame before the Sync has been received and applied.</summary>
    SyncAck = 15,
    /// <summary>S→D before round 0: the populated extents the source will send, so the destination can fault them in ahead.</summary>
    Extents = 16,
    /// <summary>
    /// D→S when a pre-copy source reattaches (capability PreCopyResume), before Attached: the
    /// pages placed in the round that was cut short, so only the others are sent again.
    /// </summary>
    Delivered = 20,

    // Several data streams (capability MultiStream; docs/protocol.md, "Several data streams").
    /// <summary>S→D on the control connection after HelloAck: "I will open this many data connections".</summary>
    Streams = 17,
    /// <summary>D→S: the data connections may attach now.</summary>
    StreamsAck = 18,
    /// <summary>S→D, first frame of a data connection: migration id, stream index, stream count.</summary>
    StreamAttach = 19,
    /// <summary>D→S on a data connection: attached.</summary>
    StreamAttached = 21,
    /// <summary>S→D on a data connection: this stream has sent all its pages of a round.</summary>
    StreamRoundEnd = 22,

    // Post-copy (capability PostCopy; docs/protocol.md, "Post-copy"). Numbered from 32 so other
    // additions can take 12.. without colliding.
    PostCopyStart = 32,
    PendingPages = 33,
    PageRequest = 34,
    PostCopyEnd = 35,
    PostCopyDone = 36,
    Attach = 37,
    Attached = 38,
    /// <summary>
    /// S→D on the page-request connection after the resume (capability LateZeros): pages announced
    /// pending at the switch that turned out zero — bitmap chunks as in PendingPages.
    /// </summary>
    LateZeros = 39,
}

/// <summary>
/// Every frame: a 16-byte header then the payload.
/// <code>
/// 0  u32 magic "LMF1"   4 u8 type   5 u8 flags   6 u16 reserved (0)
/// 8  u32 payload length 12 u32 checksum = low 32 bits of xxHash3-64(payload, seed = bytes 0..7 of the header)
/// </code>
/// The checksum's seed covers the type and flags, so a flipped type byte fails the check too.
/// </summary>
public static class FrameFormat
{
    public const uint Magic = 0x31464D4C; // "LMF1" little-endian
    public const int HeaderSize = 16;

    /// <summary>The largest payload of each type: a reader never allocates more than this for one frame.</summary>
    public static int MaxPayload(FrameType type) => type switch
    {
        FrameType.PageBatch => 2 << 20,
        FrameType.VmState => VmStateChunks.MaxPayload,
        FrameType.Extents => 2 << 20,
        FrameType.DedupQuery => 1 << 20,
        _ => 64 << 10,
    };


    public static bool IsKnown(byte type) =>
        (type >= (byte)FrameType.Hello && type <= (byte)FrameType.StreamRoundEnd) || type == (byte)FrameType.Delivered
        || (type >= (byte)FrameType.PostCopyStart && type <= (byte)FrameType.LateZeros);

    public static uint Checksum(ReadOnlySpan<byte> header8, ReadOnlySpan<byte> payload) =>
        (uint)XxHash3.HashToUInt64(payload, (long)BinaryPrimitives.ReadUInt64LittleEndian(header8));

    /// <summary>The checksum's seed for a frame of <paramref name="type"/>: header bytes 0..7 (magic, type, flags 0, reserved 0).</summary>
    public static long Seed(FrameType type) => (long)(Magic | (ulong)(byte)type << 32);

    /// <summary>
    /// The checksum of a PageBatch frame under <see cref="PageBatchCheck.PageHashes"/>
    /// (docs/protocol.md): low 32 bits of xxHash3-64 (seed = header bytes 0..7) over, for each
    /// entry, its 8-byte header and the u64 xxHash3-64 of its payload, then the 8-byte batch
    /// header. A raw page's payload hash is its verification hash, so the bytes are hashed once
    /// for both. Fills <paramref name="entryHashes"/> (one per entry) when it is large enough;
    /// null when the entries do not parse (the frame cannot be checked).
    /// </summary>
    public static uint? PageHashChecksum(ReadOnlySpan<byte> payload) => PageHashChecksum(payload, [], new XxHash3(Seed(FrameType.PageBatch)));

    /// <inheritdoc cref="PageHashChecksum(ReadOnlySpan{byte})"/>
    public static uint? PageHashChecksum(ReadOnlySpan<byte> payload, Span<ulong> entryHashes, XxHash3 digest)
    {
        if (payload.Length < 8) return null;
        uint count = BinaryPrimitives.ReadUInt32LittleEndian(payload[4..]);
        digest.Reset();
        Span<byte> record = stackalloc byte[16];
        int at = 8;
        for (uint i = 0; i < count; i++)
        {
            if (payload.Length - at < 8) return null;
            int length = BinaryPrimitives.ReadUInt16LittleEndian(payload[(at + 6)..]);
            if (payload.Length - at - 8 < length) return null;
            ulong h = XxHash3.HashToUInt64(payload.Slice(at + 8, length));
            if (i < (uint)entryHashes.Length) entryHashes[(int)i] = h;
            payload.Slice(at, 8).CopyTo(record);
            BinaryPrimitives.WriteUInt64LittleEndian(record[8..], h);
            digest.Append(record);
            at += 8 + length;
        }
        if (at != payload.Length) return null;
        digest.Append(payload[..8]);
        return (uint)digest.GetCurrentHashAsUInt64();
    }
}

/// <summary>
/// What the checksum field of a PageBatch frame holds, negotiated per migration (every other
/// frame always carries <see cref="Bytes"/>): the classic hash of the payload; a hash over the
/// entries' payload hashes (capability <c>pageHashCheck</c>: the pages are hashed once, for the
/// frame check and for verification); or nothing, on a channel whose TLS record layer
/// authenticates every byte already (capability <c>tlsUnchecked</c>).
/// </summary>
public enum PageBatchCheck : byte { Bytes, PageHashes, None }

public static class PageBatchChecks
{
    /// <summary>The check the accepted capabilities call for: no checksum over TLS, else page hashes, else the payload's.</summary>
    public static PageBatchCheck Of(Capabilities accepted) =>
        (accepted & Capabilities.TlsUnchecked) != 0 ? PageBatchCheck.None
        : (accepted & Capabilities.PageHashCheck) != 0 ? PageBatchCheck.PageHashes
        : PageBatchCheck.Bytes;

    /// <summary>The report's name of a check.</summary>
    public static string Name(PageBatchCheck c) => c switch { PageBatchCheck.PageHashes => "page-hashes", PageBatchCheck.None => "none", _ => "bytes" };
}

/// <summary>
/// Writes frames to a stream from one pooled buffer (owned here, returned on Dispose). The
/// caller fills the payload in place (<see cref="Begin"/>), then <see cref="Commit"/> adds the
/// header and sends header and payload in one write: no copy between building and sending.
/// </summary>
public sealed class FrameWriter : IDisposable
{
    private readonly Stream _stream;
    private byte[] _buffer;
    private FrameType _type;
    private bool _open;
    private int _capacity;

    public FrameWriter(Stream stream, Transport.RateLimiter? limiter = null, TimeProvider? time = null)
    {
        _stream = stream;
        Limiter = limiter;
        Time = time ?? TimeProvider.System;
        _buffer = ArrayPool<byte>.Shared.Rent(FrameFormat.HeaderSize + FrameFormat.MaxPayload(FrameType.PageBatch));
    }

    public Transport.RateLimiter? Limiter { get; set; }
    /// <summary>Bytes handed to the stream so far, headers included.</summary>
    public long BytesWritten { get; private set; }
    public long FramesWritten { get; private set; }
    /// <summary>Ticks of <see cref="Time"/> spent inside the stream's Write (blocked on the socket), rate-limiter waits not included.</summary>
    public long WriteTicks => Volatile.Read(ref _writeTicks);
    private long _writeTicks;
    private FrameSendThread? _sendThread;

    /// <summary>
    /// From now on PageBatch frames are written by a thread of its own: <see cref="Commit"/> hands
    /// the filled buffer to it and returns the other one to fill, so building the next frame (the
    /// pages' copy and hash) overlaps sending this one. Frames keep their order (any other frame
    /// waits for the pages before it, then is written by the caller); a page write's failure is
    /// thrown at the next Commit or <see cref="Flush"/>. Call on the thread that writes frames.
    /// </summary>
    public void SendOnOwnThread() => _sendThread ??= new FrameSendThread(this);
    /// <summary>The clock <see cref="WriteTicks"/> is measured with.</summary>
    public TimeProvider Time { get; }

    /// <summary>Starts a frame; returns the space for its payload.</summary>
    public Span<byte> Begin(FrameType type, int capacity = 0)
    {
        if (_open) throw new InvalidOperationException("a frame is already open");
        int max = FrameFormat.MaxPayload(type);
        int need = FrameFormat.HeaderSize + Math.Max(capacity, 0);
        if (capacity > max) throw new ArgumentOutOfRangeException(nameof(capacity), $"{type} payload limit is {max} bytes");
        if (_buffer.Length < need)
        {
            ArrayPool<byte>.Shared.Return(_buffer);
            _buffer = ArrayPool<byte>.Shared.Rent(need);
        }
        _type = type;
        _open = true;
        _capacity = Math.Min(_buffer.Length - FrameFormat.HeaderSize, max);
        return OpenPayload;
    }

    /// <summary>The open frame's payload space (the same span <see cref="Begin"/> returned).</summary>
    public Span<byte> OpenPayload => _open ? _buffer.AsSpan(FrameFormat.HeaderSize, _capacity) : throw new InvalidOperationException("no frame is open");

    public bool IsOpen => _open;

    public void Commit(int payloadLength) => Commit(payloadLength, null);

    /// <summary>
    /// Sends the open frame with <paramref name="checksum"/> in its header, computed by the
    /// caller (a PageBatch under <see cref="PageBatchCheck.PageHashes"/> or <see cref="PageBatchCheck.None"/>);
    /// null: the hash of the payload.
    /// </summary>
    public void Commit(int payloadLength, uint? checksum)
    {
        if (!_open) throw new InvalidOperationException("no frame is open");
        _open = false;
        Span<byte> h = _buffer.AsSpan(0, FrameFormat.HeaderSize);
        BinaryPrimitives.WriteUInt32LittleEndian(h, FrameFormat.Magic);
        h[4] = (byte)_type;
        h[5] = 0;
        BinaryPrimitives.WriteUInt16LittleEndian(h[6..], 0);
        BinaryPrimitives.WriteUInt32LittleEndian(h[8..], (uint)payloadLength);
        BinaryPrimitives.WriteUInt32LittleEndian(h[12..], checksum ?? FrameFormat.Checksum(h[..8], _buffer.AsSpan(FrameFormat.HeaderSize, payloadLength)));
        int total = FrameFormat.HeaderSize + payloadLength;
        Limiter?.Consume(total);
        // Only pages go through the send thread: every other frame is written here, after those
        // before it, so its write's outcome is known when Commit returns (the switch-over
        // depends on whether Commit reached the socket).
        if (_sendThread is { } thread && _type == FrameType.PageBatch) _buffer = thread.Hand(_buffer, total);
        else
        {
            _sendThread?.Drain();
            WriteOut(_buffer, total);
        }
        BytesWritten += total;
        FramesWritten++;
    }

    private void WriteOut(byte[] frame, int length)
    {
        long t0 = Time.GetTimestamp();
        _stream.Write(frame, 0, length);
        Interlocked.Add(ref _writeTicks, Time.GetTimestamp() - t0);
    }

    public void Abandon() => _open = false;

    /// <summary>Sends a whole small frame.</summary>
    public void Send(FrameType type, ReadOnlySpan<byte> payload)
    {
        payload.CopyTo(Begin(type, payload.Length));
        Commit(payload.Length);
    }

    /// <summary>
    /// Sends a frame of the handshake (Hello, Attach) or the announcement of extents at once:
    /// the bandwidth cap is for the migration's traffic, and the destination gives a handshake a
    /// deadline that a low cap must not make it miss. Its bytes are charged to the bucket all
    /// the same, so the frames after it pay them off and the cap holds on average.
    /// </summary>
    public void SendNow(FrameType type, ReadOnlySpan<byte> payload)
    {
        payload.CopyTo(Begin(type, payload.Length));
        CommitNow(payload.Length);
    }

    /// <summary><see cref="Commit"/> without waiting for the bandwidth cap (see <see cref="SendNow"/>).</summary>
    public void CommitNow(int payloadLength)
    {
        var limiter = Limiter;
        Limiter = null;
        try { Commit(payloadLength); }
        finally { Limiter = limiter; }
        limiter?.Charge(FrameFormat.HeaderSize + payloadLength);
    }

    /// <summary>A whole frame as bytes, for the few frames sent without a writer of their own (the listener's refusals during a handshake).</summary>
    public static byte[] Encode(FrameType type, ReadOnlySpan<byte> payload)
    {
        using var bytes = new MemoryStream(FrameFormat.HeaderSize + payload.Length);
        using (var w = new FrameWriter(bytes)) w.Send(type, payload);
        return bytes.ToArray();
    }

    /// <summary>Waits until every frame is written (with a send thread), then flushes the stream.</summary>
    public void Flush()
    {
        _sendThread?.Drain();
        _stream.Flush();
    }

    public void Dispose()
    {
        _sendThread?.Stop();
        byte[] b = Interlocked.Exchange(ref _buffer, []);
        if (b.Length > 0) ArrayPool<byte>.Shared.Return(b);
    }

    /// <summary>
    /// The writer's second buffer and the thread that writes it (<see cref="SendOnOwnThread"/>).
    /// Ownership: a buffer is either the writer's (being filled), queued, being written, or the
    /// spare; <see cref="Hand"/> swaps the filled one for the spare, waiting until the write of
    /// the previous frame has finished with it.
    /// </summary>
    private sealed class FrameSendThread
    {
        private readonly FrameWriter _writer;
        private readonly object _lock = new();
        private readonly Thread _thread;
        private byte[]? _spare = ArrayPool<byte>.Shared.Rent(FrameFormat.HeaderSize + FrameFormat.MaxPayload(FrameType.PageBatch));
        private byte[]? _queued;
        private int _queuedLength;
        private bool _writing, _stop;
        private ExceptionDispatchInfo? _failure;

        public FrameSendThread(FrameWriter writer)
        {
            _writer = writer;
            _thread = new Thread(Loop) { IsBackground = true, Name = "livemig-send" };
            _thread.Start();
        }

        public byte[] Hand(byte[] filled, int length)
        {
            lock (_lock)
            {
                while (_spare is null && _failure is null && !_stop) Monitor.Wait(_lock);
                _failure?.Throw();
                ObjectDisposedException.ThrowIf(_stop, _writer);
                (_queued, _queuedLength) = (filled, length);
                byte[] next = _spare!;
                _spare = null;
                Monitor.PulseAll(_lock);
                return next;
            }
        }

        public void Drain()
        {
            lock (_lock)
            {
                while ((_queued is not null || _writing) && _failure is null) Monitor.Wait(_lock);
                _failure?.Throw();
            }
        }

        private void Loop()
        {
            while (true)
            {
                byte[] frame;
                int length;
                lock (_lock)
                {
                    while (_queued is null && !_stop) Monitor.Wait(_lock);
                    if (_queued is null) return;
                    (frame, length, _queued, _writing) = (_queued, _queuedLength, null, true);
                }
                ExceptionDispatchInfo? failed = null;
                try { _writer.WriteOut(frame, length); }
                catch (Exception e) { failed = ExceptionDispatchInfo.Capture(e); }
                lock (_lock)
                {
                    (_spare, _writing, _failure) = (frame, false, _failure ?? failed);
                    Monitor.PulseAll(_lock);
                    if (failed is not null) return;
                }
            }
        }

        /// <summary>Ends the thread once the queued frame is written (bounded: a write blocked on a dead peer fails at the stream's timeout, and the thread is a background one).</summary>
        public void Stop()
        {
            lock (_lock)
            {
                _stop = true;
                Monitor.PulseAll(_lock);
            }
            if (!_thread.Join(TimeSpan.FromSeconds(5))) return; // still writing: its buffers go to the collector
            byte[]? spare = Interlocked.Exchange(ref _spare, null);
            if (spare is not null) ArrayPool<byte>.Shared.Return(spare);
        }
    }
}

/// <summary>
/// Reads and checks frames: magic, known type, bounded length (per type, before any
/// allocation), checksum. Every error names the frame's index and byte offset in the stream.
/// The returned payload stays valid until the next <see cref="Read"/>.
/// </summary>
public sealed class FrameReader : IDisposable
{
    private readonly Stream _stream;
    private readonly byte[] _header = new byte[FrameFormat.HeaderSize];
    private byte[] _buffer;
    private ulong[] _entryHashes = [];
    private int _entryCount;
    private XxHash3? _digest;

    public FrameReader(Stream stream)
    {
        _stream = stream;
        _buffer = ArrayPool<byte>.Shared.Rent(FrameFormat.HeaderSize + FrameFormat.MaxPayload(FrameType.PageBatch));
    }

    /// <summary>How PageBatch frames are checked (negotiated; every other frame: <see cref="PageBatchCheck.Bytes"/>).</summary>
    public PageBatchCheck PageBatchCheck { get; set; }

    /// <summary>
    /// Under <see cref="PageBatchCheck.PageHashes"/>, the xxHash3-64 of each entry's payload of the
    /// PageBatch just read (a raw page's is its verification hash); empty otherwise. Valid until the next <see cref="Read"/>.
    /// </summary>
    public ReadOnlySpan<ulong> EntryHashes => _entryHashes.AsSpan(0, _entryCount);

    public long BytesRead { get; private set; }
    public long FramesRead { get; private set; }

    public FrameType Read(out ReadOnlySpan<byte> payload)
    {
        long at = BytesRead;
        // Error texts are built only when there is an error: this runs for every frame.
        long index = FramesRead;
        ReadExactly(_header, index, at, null, 0);
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(_header);
        if (magic != FrameFormat.Magic) throw new ProtocolException($"{Where(index, at)}: bad magic 0x{magic:X8} (not a LiveMig stream, or out of sync)");
        byte type = _header[4];
        if (!FrameFormat.IsKnown(type)) throw new ProtocolException($"{Where(index, at)}: unknown frame type {type}");
        if (_header[5] != 0 || _header[6] != 0 || _header[7] != 0) throw new ProtocolException($"{Where(index, at)}: reserved header bits set");
        uint length = BinaryPrimitives.ReadUInt32LittleEndian(_header.AsSpan(8));
        int max = FrameFormat.MaxPayload((FrameType)type);
        if (length > (uint)max) throw new ProtocolException($"{Where(index, at)}: {(FrameType)type} payload of {length} bytes exceeds the limit of {max}");
        if (_buffer.Length < length)
        {
            ArrayPool<byte>.Shared.Return(_buffer);
            _buffer = ArrayPool<byte>.Shared.Rent((int)length);
        }
        ReadExactly(_buffer.AsSpan(0, (int)length), index, at, (FrameType)type, length);
        uint sum = BinaryPrimitives.ReadUInt32LittleEndian(_header.AsSpan(12));
        payload = _buffer.AsSpan(0, (int)length);
        _entryCount = 0;
        var check = type == (byte)FrameType.PageBatch ? PageBatchCheck : PageBatchCheck.Bytes;
        if (check == PageBatchCheck.PageHashes) CheckPageHashes(payload, sum, index, at);
        else if (check == PageBatchCheck.Bytes && FrameFormat.Checksum(_header.AsSpan(0, 8), payload) != sum)
            throw new ProtocolException($"{Where(index, at)}: checksum mismatch in {(FrameType)type} frame of {length} bytes (corrupted in transit)", linkFailure: true);
        FramesRead++;
        return (FrameType)type;
    }

    /// <summary>
    /// Hands over the buffers that hold the frame just read (its payload from offset 0, and its
    /// <see cref="EntryHashes"/>) in exchange for <paramref name="payload"/> and
    /// <paramref name="entryHashes"/> (pooled buffers too, or empty), so that frame can be placed on
    /// another thread while this reader reads the next into the replacements. The span the last
    /// <see cref="Read"/> returned now lies in the buffer handed out: the reader no longer touches it.
    /// </summary>
    public void Exchange(ref byte[] payload, ref ulong[] entryHashes)
    {
        (payload, _buffer) = (_buffer, payload);
        (entryHashes, _entryHashes) = (_entryHashes, entryHashes);
        _entryCount = 0;
        if (_buffer.Length < FrameFormat.HeaderSize + FrameFormat.MaxPayload(FrameType.PageBatch))
        {
            if (_buffer.Length > 0) ArrayPool<byte>.Shared.Return(_buffer);
            _buffer = ArrayPool<byte>.Shared.Rent(FrameFormat.HeaderSize + FrameFormat.MaxPayload(FrameType.PageBatch));
        }
    }

    /// <summary>Checks a PageBatch by its entries' payload hashes, keeping them for the placer (<see cref="EntryHashes"/>).</summary>
    private void CheckPageHashes(ReadOnlySpan<byte> payload, uint sum, long index, long at)
    {
        // Entries are at least 8 bytes: this bounds the count before anything is sized by it.
        int most = payload.Length / 8;
        uint count = payload.Length >= 8 ? BinaryPrimitives.ReadUInt32LittleEndian(payload[4..]) : 0;
        int n = (int)Math.Min(count, (uint)most);
        if (_entryHashes.Length < n)
        {
            if (_entryHashes.Length > 0) ArrayPool<ulong>.Shared.Return(_entryHashes);
            _entryHashes = ArrayPool<ulong>.Shared.Rent(Math.Max(n, 512));
        }
        _digest ??= new XxHash3(FrameFormat.Seed(FrameType.PageBatch));
        uint? computed = count <= (uint)most ? FrameFormat.PageHashChecksum(payload, _entryHashes, _digest) : null;
        if (computed != sum)
            throw new ProtocolException($"{Where(index, at)}: checksum mismatch in PageBatch frame of {payload.Length} bytes ({(computed is null ? "its entries do not parse" : "page hashes differ")}; corrupted in transit)", linkFailure: true);
        _entryCount = n;
    }

    /// <summary>The stream's read timeout, which a timed-out read is reported against.</summary>
    private TimeSpan? ReadTimeout
    {
        get
        {
            try { return _stream.CanTimeout && _stream.ReadTimeout > 0 ? TimeSpan.FromMilliseconds(_stream.ReadTimeout) : null; }
            catch (Exception e) when (e is InvalidOperationException or ObjectDisposedException) { return null; }
        }
    }

    private static string What(FrameType? type, uint length) => type is null ? "header" : $"{type} payload ({length} bytes)";

    private static string Where(long index, long at) => $"frame {index} at stream byte {at}";

    private void ReadExactly(Span<byte> into, long index, long at, FrameType? type, uint length)
    {
        int got = 0;
        while (got < into.Length)
        {
            int n;
            try { n = _stream.Read(into[got..]); }
            catch (IOException e) { throw new ProtocolException($"{Where(index, at)}: connection failed while reading the {What(type, length)}: {Transport.LinkFailure.Describe(e, ReadTimeout)}", linkFailure: true); }
            if (n == 0)
                throw new ProtocolException(got == 0 && type is null
                    ? $"{Where(index, at)}: peer closed the connection"
                    : $"{Where(index, at)}: peer closed the connection in the middle of the {What(type, length)} ({got} of {into.Length} bytes)", linkFailure: true);
            got += n;
            BytesRead += n;
        }
    }

    public void Dispose()
    {
        byte[] b = Interlocked.Exchange(ref _buffer, []);
        if (b.Length > 0) ArrayPool<byte>.Shared.Return(b);
        ulong[] h = Interlocked.Exchange(ref _entryHashes, []);
        if (h.Length > 0) ArrayPool<ulong>.Shared.Return(h);
    }
}
