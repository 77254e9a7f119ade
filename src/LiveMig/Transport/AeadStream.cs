using System.Buffers.Binary;
using System.Security.Cryptography;
using LiveMig.Protocol;

namespace LiveMig.Transport;

/// <summary>
/// The record layer a secured connection uses once its TLS 1.3 handshake (and, in PSK mode, the
/// key proof) is done: AES-256-GCM records straight on the socket, keyed from secrets the two
/// sides exchanged inside TLS (<see cref="DataKeys"/>; docs/protocol.md, "TLS"). Why not stay on
/// SslStream: on this machine it moved 0.33–0.46 GB/s at 2–2.7 s of CPU per GiB over loopback,
/// where the same cipher through <see cref="AesGcm"/> runs at 3.3–4 GB/s — TLS made a migration
/// three times slower than in the clear.
/// <para>
/// A record: u32 little-endian plaintext length n (1 ≤ n ≤ <see cref="MaxRecord"/>), n bytes of
/// ciphertext, a 16-byte tag; the length is the additional authenticated data. The nonce is the
/// direction's IV XOR the record's sequence number (as TLS 1.3 does), so records cannot be
/// dropped, replayed or reordered without the next tag failing. One writer and one reader at a
/// time (as every LiveMig connection is used).
/// </para>
/// </summary>
public sealed class AeadStream : Stream
{
    /// <summary>Plaintext bytes per record, at most.</summary>
    public const int MaxRecord = 256 * 1024;
    private const int HeaderSize = 4, TagSize = 16, NonceSize = 12;

    private readonly Stream _inner;
    private readonly IDisposable? _owner;
    private readonly AesGcm _send, _receive;
    private readonly byte[] _sendKey, _receiveKey, _sendIv, _receiveIv;
    private ulong _sendSeq, _receiveSeq;
    // 2 × 256 KiB per secured connection, made when its handshake is done (not pooled: the pool would round them up to 512 KiB).
    private readonly byte[] _out = GC.AllocateUninitializedArray<byte>(HeaderSize + MaxRecord + TagSize);
    private readonly byte[] _in = GC.AllocateUninitializedArray<byte>(HeaderSize + MaxRecord + TagSize);
    private int _plainStart, _plainEnd; // decrypted bytes not yet read, in _in
    private bool _disposed, _lent;

    /// <summary>Over <paramref name="inner"/> (the socket's stream); <paramref name="owner"/> (the finished SslStream) is disposed with it.</summary>
    public AeadStream(Stream inner, DataKeys keys, bool client, IDisposable? owner = null)
    {
        _inner = inner;
        _owner = owner;
        var (sendKey, sendIv, receiveKey, receiveIv) = client ? (keys.ClientKey, keys.ClientIv, keys.ServerKey, keys.ServerIv) : (keys.ServerKey, keys.ServerIv, keys.ClientKey, keys.ClientIv);
        _send = new AesGcm(sendKey, TagSize);
        _receive = new AesGcm(receiveKey, TagSize);
        (_sendKey, _receiveKey, _sendIv, _receiveIv) = (sendKey, receiveKey, sendIv, receiveIv);
    }

    /// <summary>The stream the records travel on (the socket's).</summary>
    internal Stream Inner => _inner;

    /// <summary>The record layer's state at a hand-over: keys, IVs and the next record's sequence number, per direction.</summary>
    internal readonly record struct RecordState(byte[] SendKey, byte[] SendIv, ulong SendSeq, byte[] ReceiveKey, byte[] ReceiveIv, ulong ReceiveSeq);

    /// <summary>
    /// Hands the connection to code outside this object (the native fault-service thread, which
    /// then reads and writes the records itself, native/uffd_serve.c): its state, and the socket's
    /// stream under it. From here on this stream refuses reads and writes (two writers would reuse
    /// a nonce; two readers would lose records), so nothing may be left unread in it.
    /// </summary>
    internal (RecordState State, Stream Inner) Lend()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_lent) throw new InvalidOperationException("this TLS record stream is already lent out");
        if (_plainStart < _plainEnd) throw new InvalidOperationException($"{_plainEnd - _plainStart} decrypted bytes are still unread: the connection cannot change hands mid-record");
        _lent = true;
        return (new RecordState(_sendKey, _sendIv, _sendSeq, _receiveKey, _receiveIv, _receiveSeq), _inner);
    }

    private void ThrowIfUnusable()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_lent) throw new InvalidOperationException("this TLS record stream was handed to the native fault-service thread");
    }

    private static void Nonce(Span<byte> nonce, byte[] iv, ulong seq)
    {
        iv.CopyTo(nonce);
        ulong tail = BinaryPrimitives.ReadUInt64BigEndian(nonce[4..]) ^ seq;
        BinaryPrimitives.WriteUInt64BigEndian(nonce[4..], tail);
    }

    // ---- writing ---------------------------------------------------------------------------

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        while (!buffer.IsEmpty)
        {
            int n = Seal(buffer);
            _inner.Write(_out, 0, HeaderSize + n + TagSize);
            buffer = buffer[n..];
        }
    }

    public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        while (!buffer.IsEmpty)
        {
            int n = Seal(buffer.Span);
            await _inner.WriteAsync(_out.AsMemory(0, HeaderSize + n + TagSize), cancellationToken).ConfigureAwait(false);
            buffer = buffer[n..];
        }
    }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    /// <summary>Encrypts the next record of <paramref name="plain"/> into <see cref="_out"/>; returns the plaintext bytes it took.</summary>
    private int Seal(ReadOnlySpan<byte> plain)
    {
        ThrowIfUnusable();
        int n = Math.Min(plain.Length, MaxRecord);
        BinaryPrimitives.WriteUInt32LittleEndian(_out, (uint)n);
        Span<byte> nonce = stackalloc byte[NonceSize];
        Nonce(nonce, _sendIv, _sendSeq++);
        _send.Encrypt(nonce, plain[..n], _out.AsSpan(HeaderSize, n), _out.AsSpan(HeaderSize + n, TagSize), _out.AsSpan(0, HeaderSize));
        return n;
    }

    public override void Flush() => _inner.Flush();
    public override Task FlushAsync(CancellationToken cancellationToken) => _inner.FlushAsync(cancellationToken);

    // ---- reading ---------------------------------------------------------------------------

    public override int Read(Span<byte> buffer)
    {
        if (buffer.IsEmpty) return 0;
        if (_plainStart < _plainEnd) return Drain(buffer);
        int n = ReadRecordAsync(sync: true, default).GetAwaiter().GetResult();
        return n == 0 ? 0 : Open(n, buffer);
    }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (buffer.IsEmpty) return 0;
        if (_plainStart < _plainEnd) return Drain(buffer.Span);
        int n = await ReadRecordAsync(sync: false, cancellationToken).ConfigureAwait(false);
        return n == 0 ? 0 : Open(n, buffer.Span);
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    private int Drain(Span<byte> buffer)
    {
        int n = Math.Min(buffer.Length, _plainEnd - _plainStart);
        _in.AsSpan(_plainStart, n).CopyTo(buffer);
        _plainStart += n;
        return n;
    }

    /// <summary>Reads one record's header and sealed bytes into <see cref="_in"/>; its plaintext length, or 0 at a clean end of the connection.</summary>
    private async ValueTask<int> ReadRecordAsync(bool sync, CancellationToken cancel)
    {
        ThrowIfUnusable();
        int got = sync ? _inner.Read(_in, 0, HeaderSize) : await _inner.ReadAsync(_in.AsMemory(0, HeaderSize), cancel).ConfigureAwait(false);
        if (got == 0) return 0; // closed between records
        if (got < HeaderSize) await Fill(sync, got, HeaderSize, cancel).ConfigureAwait(false);
        uint n = BinaryPrimitives.ReadUInt32LittleEndian(_in);
        if (n == 0 || n > MaxRecord) throw new ProtocolException($"TLS record {_receiveSeq}: length {n} outside 1..{MaxRecord} (not a LiveMig peer, or the stream is corrupt)");
        await Fill(sync, HeaderSize, HeaderSize + (int)n + TagSize, cancel).ConfigureAwait(false);
        return (int)n;
    }

    private async ValueTask Fill(bool sync, int from, int to, CancellationToken cancel)
    {
        try
        {
            if (sync) _inner.ReadExactly(_in, from, to - from);
            else await _inner.ReadExactlyAsync(_in.AsMemory(from, to - from), cancel).ConfigureAwait(false);
        }
        catch (EndOfStreamException e) { throw new IOException($"the connection closed inside TLS record {_receiveSeq}", e); }
    }

    /// <summary>Authenticates and decrypts the record in <see cref="_in"/>: straight into <paramref name="buffer"/> when it fits, else into <see cref="_in"/> to be drained.</summary>
    private int Open(int n, Span<byte> buffer)
    {
        Span<byte> nonce = stackalloc byte[NonceSize];
        Nonce(nonce, _receiveIv, _receiveSeq);
        var sealedBytes = _in.AsSpan(HeaderSize, n);
        var tag = _in.AsSpan(HeaderSize + n, TagSize);
        bool direct = buffer.Length >= n;
        var plain = direct ? buffer[..n] : sealedBytes; // in place: AesGcm allows the very same buffer
        try { _receive.Decrypt(nonce, sealedBytes, tag, plain, _in.AsSpan(0, HeaderSize)); }
        catch (AuthenticationTagMismatchException)
        {
            throw new ProtocolException($"TLS record {_receiveSeq} failed authentication: changed, dropped or replayed in transit");
        }
        _receiveSeq++;
        if (direct) return n;
        (_plainStart, _plainEnd) = (HeaderSize, HeaderSize + n);
        return Drain(buffer);
    }

    // ---- the rest of Stream ----------------------------------------------------------------

    public override bool CanRead => !_disposed;
    public override bool CanWrite => !_disposed;
    public override bool CanSeek => false;
    public override bool CanTimeout => _inner.CanTimeout;
    public override int ReadTimeout { get => _inner.ReadTimeout; set => _inner.ReadTimeout = value; }
    public override int WriteTimeout { get => _inner.WriteTimeout; set => _inner.WriteTimeout = value; }
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing && !_disposed)
        {
            _disposed = true;
            _inner.Dispose();
            _owner?.Dispose();
            _send.Dispose();
            _receive.Dispose();
        }
        base.Dispose(disposing);
    }
}

/// <summary>
/// The record layer's keys, from 32 random bytes each side sent inside the authenticated TLS
/// channel: HKDF-SHA256 over both, salted with the channel binding (the server certificate's
/// hash) and, in PSK mode, the key — a key per direction and an IV per direction.
/// </summary>
public sealed record DataKeys(byte[] ClientKey, byte[] ClientIv, byte[] ServerKey, byte[] ServerIv)
{
    public const int SecretSize = 32;

    public static DataKeys Derive(ReadOnlySpan<byte> clientSecret, ReadOnlySpan<byte> serverSecret, ReadOnlySpan<byte> binding, ReadOnlySpan<byte> psk)
    {
        byte[] ikm = [.. clientSecret, .. serverSecret];
        byte[] salt = SHA256.HashData([.. "livemig-data-v1"u8, .. binding, .. psk]);
        byte[] prk = HKDF.Extract(HashAlgorithmName.SHA256, ikm, salt);
        byte[] Expand(string label, int length) => HKDF.Expand(HashAlgorithmName.SHA256, prk, length, System.Text.Encoding.ASCII.GetBytes(label));
        return new DataKeys(Expand("c2s key", 32), Expand("c2s iv", 12), Expand("s2c key", 32), Expand("s2c iv", 12));
    }
}
