using System.Net.Sockets;

namespace LiveMig.Transport;

/// <summary>
/// A secured connection whose first bytes were read already — the listener reads a
/// connection's first frame on no thread of its own, then hands the connection to one —:
/// reads return those bytes first, then the connection's.
/// </summary>
public sealed class ReplayStream(byte[] first, Stream inner) : DelegatingStream(inner)
{
    private readonly Replay _replay = new(first);

    /// <summary>The connection under the replayed bytes (e.g. the SslStream, for <see cref="ChannelSecurity.IsSecured"/>).</summary>
    public Stream Connection => Inner;

    /// <summary>Whether every replayed byte has been read (then reading this is reading <see cref="Connection"/>).</summary>
    public bool Drained => _replay.Drained;

    public override int Read(Span<byte> buffer) => _replay.TryRead(buffer, out int n) ? n : Inner.Read(buffer);
}

/// <summary>
/// <see cref="ReplayStream"/> for a plain TCP connection. Still a <see cref="NetworkStream"/>:
/// whatever needs the socket itself (post-copy's native fault thread, socket-buffer tuning)
/// finds it, once the replayed bytes have been read.
/// </summary>
public sealed class ReplayNetworkStream(Socket socket, byte[] first) : NetworkStream(socket, ownsSocket: true)
{
    private readonly Replay _replay = new(first);

    public override int Read(Span<byte> buffer) => _replay.TryRead(buffer, out int n) ? n : base.Read(buffer);
    public override int Read(byte[] buffer, int offset, int count) => _replay.TryRead(buffer.AsSpan(offset, count), out int n) ? n : base.Read(buffer, offset, count);
    public override int ReadByte()
    {
        Span<byte> one = stackalloc byte[1];
        return Read(one) == 1 ? one[0] : -1;
    }

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancel = default) =>
        _replay.TryRead(buffer.Span, out int n) ? ValueTask.FromResult(n) : base.ReadAsync(buffer, cancel);

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancel) =>
        _replay.TryRead(buffer.AsSpan(offset, count), out int n) ? Task.FromResult(n) : base.ReadAsync(buffer, offset, count, cancel);
}

/// <summary>The bytes still to be replayed.</summary>
internal sealed class Replay(byte[] first)
{
    private int _at;

    public bool Drained => _at >= first.Length;

    public bool TryRead(Span<byte> into, out int n)
    {
        n = Math.Min(into.Length, first.Length - _at);
        if (n <= 0) return false;
        first.AsSpan(_at, n).CopyTo(into);
        _at += n;
        return true;
    }
}
