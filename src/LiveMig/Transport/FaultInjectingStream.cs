using System.Buffers;
using System.Net.Sockets;

namespace LiveMig.Transport;

/// <summary>
/// What <see cref="FaultInjectingStream"/> does to the bytes written through it. Offsets count
/// the bytes handed to the wrapper's Write calls since it was made (0 = the first byte). Every
/// fault is deterministic and fires at most once. Test-only: nothing in the product uses it.
/// </summary>
public sealed record FaultPlan
{
    /// <summary>
    /// After this many bytes have been forwarded, the connection is cut: the inner stream is
    /// disposed and this write, and every later read or write, throws <see cref="IOException"/>.
    /// </summary>
    public long? DropAfter { get; init; }

    /// <summary>
    /// After this many bytes have been forwarded, nothing more is: the write side is closed
    /// (a socket is shut down for sending, so the peer sees end of stream while its replies
    /// can still be read) and later writes are silently discarded.
    /// </summary>
    public long? TruncateAfter { get; init; }

    /// <summary>The byte at this offset is XORed with <see cref="CorruptMask"/> on its way out.</summary>
    public long? CorruptAt { get; init; }

    public byte CorruptMask { get; init; } = 0xFF;

    /// <summary>The write that carries the byte at this offset first sleeps <see cref="Delay"/>.</summary>
    public long? DelayAt { get; init; }

    public TimeSpan Delay { get; init; }
}

/// <summary>
/// A <see cref="Stream"/> decorator that injects one planned fault into the write direction
/// (drop, truncate, corrupt a byte, delay), for failure tests. Reads pass through unchanged
/// (until a drop, after which they fail like the writes). Disposing it disposes the inner stream.
/// </summary>
public sealed class FaultInjectingStream(Stream inner, FaultPlan plan) : DelegatingStream(inner)
{
    private long _written;
    private bool _delayed, _truncated, _dropped;
    private int _triggered;

    /// <summary>The wrapped stream.</summary>
    public new Stream Inner => base.Inner;
    public FaultPlan Plan => plan;

    /// <summary>Bytes handed to Write so far (forwarded or not).</summary>
    public long BytesWritten => Interlocked.Read(ref _written);

    /// <summary>True once the planned fault has fired (a test can check its fault really happened).</summary>
    public bool Triggered => Volatile.Read(ref _triggered) != 0;

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        if (_dropped) throw Dropped();
        long start = _written;
        long end = start + buffer.Length;

        if (plan.DelayAt is long d && !_delayed && d >= start && d < end)
        {
            _delayed = true;
            Trip();
            Thread.Sleep(plan.Delay);
        }

        if (plan.DropAfter is long drop && end > drop)
        {
            Forward(buffer[..(int)Math.Max(0, drop - start)], start);
            _written = end;
            _dropped = true;
            Trip();
            Inner.Dispose();
            throw Dropped();
        }

        if (_truncated) { _written = end; return; }
        if (plan.TruncateAfter is long cut && end > cut)
        {
            Forward(buffer[..(int)Math.Max(0, cut - start)], start);
            _written = end;
            _truncated = true;
            Trip();
            CloseWriteSide();
            return;
        }

        Forward(buffer, start);
        _written = end;
    }

    /// <summary>Writes to the inner stream, corrupting the planned byte if it is in this piece.</summary>
    private void Forward(ReadOnlySpan<byte> piece, long start)
    {
        if (piece.IsEmpty) return;
        if (plan.CorruptAt is long k && k >= start && k < start + piece.Length)
        {
            // Never touch the caller's buffer: copy, flip, send.
            byte[] copy = ArrayPool<byte>.Shared.Rent(piece.Length);
            try
            {
                piece.CopyTo(copy);
                copy[k - start] ^= plan.CorruptMask;
                Trip();
                Inner.Write(copy, 0, piece.Length);
            }
            finally { ArrayPool<byte>.Shared.Return(copy); }
        }
        else Inner.Write(piece);
    }

    private void CloseWriteSide()
    {
        try
        {
            Inner.Flush();
            if (Inner is NetworkStream ns) ns.Socket.Shutdown(SocketShutdown.Send);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException) { }
    }

    private void Trip() => Volatile.Write(ref _triggered, 1);

    private IOException Dropped() => new($"fault injection: connection dropped after {plan.DropAfter} bytes");

    public override int Read(Span<byte> buffer) => _dropped ? throw Dropped() : Inner.Read(buffer);

    public override void Flush()
    {
        if (_dropped) throw Dropped();
        if (!_truncated) Inner.Flush();
    }
}
