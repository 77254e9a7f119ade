namespace LiveMig.Transport;

/// <summary>
/// A non-seekable stream over another one: reads, writes, timeouts and disposal go to the
/// inner stream. Wrappers that watch or change the traffic (fault injection, recording,
/// tests' link cutters) override only <see cref="Read(Span{byte})"/> and
/// <see cref="Write(ReadOnlySpan{byte})"/>; the array overloads route through those.
/// </summary>
public abstract class DelegatingStream(Stream inner) : Stream
{
    protected Stream Inner { get; } = inner;

    public override int Read(Span<byte> buffer) => Inner.Read(buffer);
    public override void Write(ReadOnlySpan<byte> buffer) => Inner.Write(buffer);
    public sealed override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
    public sealed override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
    public override void Flush() => Inner.Flush();

    public override bool CanRead => Inner.CanRead;
    public override bool CanWrite => Inner.CanWrite;
    public override bool CanSeek => false;
    public override bool CanTimeout => Inner.CanTimeout;
    public override int ReadTimeout { get => Inner.ReadTimeout; set => Inner.ReadTimeout = value; }
    public override int WriteTimeout { get => Inner.WriteTimeout; set => Inner.WriteTimeout = value; }

    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing) Inner.Dispose();
        base.Dispose(disposing);
    }
}
