using System.Buffers.Binary;
using System.Net.Sockets;
using LiveMig.Protocol;
using LiveMig.Transport;

namespace LiveMig.Engine;

/// <summary>A connection through its handshake: the stream to run it on (its first frame replayed) and the authenticated peer's name.</summary>
internal sealed record OpenedConnection(Stream Stream, string? Peer);

/// <summary>
/// Takes each accepted connection through its handshake — TLS (or the check that the peer
/// speaks plain frames when the listener does) and its first frame (Hello, Attach or
/// StreamAttach) — with asynchronous I/O and no thread of its own, within one deadline for the
/// whole of it (<see cref="DestinationOptions.HandshakeTimeout"/>), and with at most
/// <see cref="DestinationOptions.MaxHandshakes"/> connections in a handshake at once: more are
/// closed at once and counted. A peer that says nothing or drips its Hello byte by byte costs
/// a socket and a few hundred bytes until the deadline, never a thread; only a connection whose
/// first frame has arrived gets one (the listener's). A peer that speaks TLS to a plain
/// listener, plain frames to a TLS listener, or is not accepted after TLS, is told why in a
/// form it can read before the connection is closed.
/// </summary>
internal sealed class HandshakeGate(DestinationOptions options, Action<string> dropped, Action<string> failed)
{
    private int _inProgress;
    private long _refused, _expired;
    private bool _refusing; // between the first refusal of a burst and the next admission

    /// <summary>Connections in their handshake now.</summary>
    public int InProgress => Volatile.Read(ref _inProgress);
    /// <summary>Connections closed at once because <see cref="DestinationOptions.MaxHandshakes"/> were in a handshake.</summary>
    public long Refused => Interlocked.Read(ref _refused);
    /// <summary>Connections dropped at the handshake deadline.</summary>
    public long Expired => Interlocked.Read(ref _expired);

    /// <summary>The connection, through its handshake; null when it was refused, dropped or closed by the peer (said through the callbacks).</summary>
    public async Task<OpenedConnection?> OpenAsync(Socket socket, CancellationToken stop)
    {
        if (!Admit(socket)) return null;
        string who = Who(socket);
        var net = new NetworkStream(socket, ownsSocket: true);
        using var timer = new CancellationTokenSource(options.HandshakeTimeout, options.Time);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(timer.Token, stop);
        Stream stream = net;
        try
        {
            bool tls = await StartsWithTls(socket, deadline.Token);
            if (tls != options.Security.Enabled) { await RefuseMismatch(net, tls, who, deadline.Token); return null; }
            var channel = await options.Security.SecureServerAsync(net, options.HandshakeTimeout, deadline.Token);
            stream = channel.Stream;
            byte[] first = await ReadFirstFrame(stream, deadline.Token);
            if (channel.Refusal is { } refusal)
            {
                failed(refusal.Message);
                await SendError(stream, ErrorMessage.Refused, "refused: " + refusal.ToPeer, deadline.Token);
                return Closed(stream);
            }
            return new OpenedConnection(stream == net ? new ReplayNetworkStream(socket, first) : new ReplayStream(first, stream), channel.Peer);
        }
        catch (Exception e) when (deadline.IsCancellationRequested && e is OperationCanceledException or IOException or AuthenticationFailedException or SocketException or ObjectDisposedException)
        {
            if (stop.IsCancellationRequested) return Closed(stream); // the listener is closing
            Interlocked.Increment(ref _expired);
            dropped($"connection from {who} dropped: its handshake (TLS and first frame) was not done within the deadline of {options.HandshakeTimeout.TotalSeconds:0.#} s");
            return Closed(stream);
        }
        catch (AuthenticationFailedException e)
        {
            failed(e.Message);
            return Closed(stream);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            failed($"connection from {who} ended in its handshake: {(e is EndOfStreamException ? "peer closed the connection" : LinkFailure.Describe(e))}");
            return Closed(stream);
        }
        finally
        {
            Interlocked.Decrement(ref _inProgress);
        }
    }

    private static OpenedConnection? Closed(Stream stream)
    {
        try { stream.Dispose(); } catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException) { }
        return null;
    }

    /// <summary>Counts the connection in, or closes it at once when the handshakes in progress are at the limit.</summary>
    private bool Admit(Socket socket)
    {
        if (Interlocked.Increment(ref _inProgress) <= options.MaxHandshakes)
        {
            if (_refusing) { _refusing = false; dropped($"accepting connections again ({Refused} refused so far)"); }
            return true;
        }
        Interlocked.Decrement(ref _inProgress);
        Interlocked.Increment(ref _refused);
        socket.Dispose();
        // One line per burst, not one per connection: a flood must not flood the log too.
        if (!_refusing) { _refusing = true; dropped($"refusing connections: {options.MaxHandshakes} are in their handshake already (the limit); further refusals are counted"); }
        return false;
    }

    private static string Who(Socket socket)
    {
        try { return socket.RemoteEndPoint?.ToString() ?? "?"; }
        catch (SocketException) { return "?"; }
    }

    /// <summary>TLS or plain frames, from the first byte: a TLS ClientHello record starts 0x16 (then 0x03), a frame with the magic "LMF1".</summary>
    private static async Task<bool> StartsWithTls(Socket socket, CancellationToken cancel)
    {
        var first = new byte[1];
        // Closed before a byte: reported like any handshake cut short (a `listen --once` waits for an outcome).
        if (await socket.ReceiveAsync(first, SocketFlags.Peek, cancel) == 0) throw new EndOfStreamException();
        return first[0] == TlsHandshakeRecord;
    }

    private const byte TlsHandshakeRecord = 0x16;

    /// <summary>The peer and this listener disagree about TLS: read what it sent first, answer in plain frames, close.</summary>
    private async Task RefuseMismatch(NetworkStream net, bool peerTls, string who, CancellationToken cancel)
    {
        if (peerTls)
        {
            // A TLS client cannot read our frames, but it sees their magic and says so (ChannelSecurity.SecureClient).
            await ReadTlsRecord(net, cancel);
            failed($"the source at {who} spoke TLS; this destination does not use TLS (--tls on the source only)");
            await SendError(net, ErrorMessage.Refused, "refused: this destination does not use TLS (--tls on the source only)", cancel);
        }
        else
        {
            await ReadFirstFrame(net, cancel);
            failed($"the source at {who} did not use TLS (--tls)");
            await SendError(net, ErrorMessage.Refused, "refused: the destination expects TLS (--tls)", cancel);
        }
        Closed(net);
    }

    /// <summary>
    /// The connection's first frame, whole: header and payload when the header is that of an
    /// opening frame within its size limit; else only the header, for the migration's frame
    /// reader to refuse with its precise message.
    /// </summary>
    private static async Task<byte[]> ReadFirstFrame(Stream stream, CancellationToken cancel)
    {
        var header = new byte[FrameFormat.HeaderSize];
        await stream.ReadExactlyAsync(header, cancel);
        var type = (FrameType)header[4];
        uint length = BinaryPrimitives.ReadUInt32LittleEndian(header.AsSpan(8));
        bool opening = BinaryPrimitives.ReadUInt32LittleEndian(header) == FrameFormat.Magic
            && type is FrameType.Hello or FrameType.Attach or FrameType.StreamAttach && length <= FrameFormat.MaxPayload(type);
        if (!opening) return header;
        var frame = new byte[FrameFormat.HeaderSize + length];
        header.CopyTo(frame, 0);
        await stream.ReadExactlyAsync(frame.AsMemory(FrameFormat.HeaderSize), cancel);
        return frame;
    }

    /// <summary>Reads one TLS record (the ClientHello), so that closing after the answer does not reset the connection under it.</summary>
    private static async Task ReadTlsRecord(Stream stream, CancellationToken cancel)
    {
        var header = new byte[5];
        await stream.ReadExactlyAsync(header, cancel);
        int length = BinaryPrimitives.ReadUInt16BigEndian(header.AsSpan(3));
        await stream.ReadExactlyAsync(new byte[Math.Min(length, MaxTlsRecord)], cancel);
    }

    private const int MaxTlsRecord = 18432; // 2^14 plus expansion (RFC 8446, 5.2)

    private static async Task SendError(Stream stream, ushort code, string text, CancellationToken cancel)
    {
        var payload = new byte[4 + System.Text.Encoding.UTF8.GetMaxByteCount(text.Length)];
        int n = new ErrorMessage(code, text).Write(payload);
        await stream.WriteAsync(FrameWriter.Encode(FrameType.Error, payload.AsSpan(0, n)), cancel);
        await stream.FlushAsync(cancel);
    }
}
