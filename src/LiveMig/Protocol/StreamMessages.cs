namespace LiveMig.Protocol;

/// <summary>
/// The frames of a multi-stream migration (capability <see cref="Capabilities.MultiStream"/>;
/// docs/protocol.md, "Several data streams"). Pages travel on N data connections; which stream
/// carries a page is fixed: <see cref="StreamOf"/>, by 64-page chunk, so every version of a page
/// travels on one connection, in order.
/// </summary>
public static class StreamLayout
{
    /// <summary>Most data connections a destination accepts for one migration.</summary>
    public const int MaxStreams = 16;

    /// <summary>Pages per chunk: one 64-bit word of a page bitmap, so a bitmap word belongs to one stream.</summary>
    public const int ChunkPages = 64;

    /// <summary>The stream that carries <paramref name="page"/> when there are <paramref name="streams"/> of them.</summary>
    public static int StreamOf(long page, int streams) => (int)((ulong)(page >> 6) % (ulong)streams);
}

/// <summary>Streams (S→D) and StreamsAck (D→S), on the control connection: the number of data connections.</summary>
public readonly record struct StreamsMessage(int Count)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U16((ushort)Count); return w.Position; }

    public static StreamsMessage Parse(ReadOnlySpan<byte> payload, string what)
    {
        var r = new SpanReader(payload, what);
        var m = new StreamsMessage(r.U16("count"));
        r.End();
        return m;
    }
}

/// <summary>S→D, first frame of a data connection: which migration, which stream of how many.</summary>
public readonly record struct StreamAttachMessage(Guid MigrationId, int Index, int Count)
{
    public int Write(Span<byte> into)
    {
        var w = new SpanWriter(into);
        MigrationId.TryWriteBytes(w.Remaining); w.Advance(16);
        w.U16((ushort)Index); w.U16((ushort)Count);
        return w.Position;
    }

    public static StreamAttachMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "StreamAttach");
        var m = new StreamAttachMessage(new Guid(r.Bytes(16, "migrationId")), r.U16("index"), r.U16("count"));
        r.End();
        if (m.Count < 1 || m.Count > StreamLayout.MaxStreams) throw new ProtocolException($"StreamAttach: {m.Count} streams is out of range 1..{StreamLayout.MaxStreams}");
        if (m.Index >= m.Count) throw new ProtocolException($"StreamAttach: stream index {m.Index} is out of range 0..{m.Count - 1}");
        return m;
    }
}

/// <summary>D→S on a data connection: the stream is attached.</summary>
public readonly record struct StreamAttachedMessage(int Index)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U16((ushort)Index); return w.Position; }

    public static StreamAttachedMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "StreamAttached");
        var m = new StreamAttachedMessage(r.U16("index"));
        r.End();
        return m;
    }
}

/// <summary>S→D on a data connection: the stream has sent its <see cref="Pages"/> pages of <see cref="Round"/>.</summary>
public readonly record struct StreamRoundEndMessage(int Round, long Pages)
{
    public int Write(Span<byte> into) { var w = new SpanWriter(into); w.U32((uint)Round); w.I64(Pages); return w.Position; }

    public static StreamRoundEndMessage Parse(ReadOnlySpan<byte> payload)
    {
        var r = new SpanReader(payload, "StreamRoundEnd");
        var m = new StreamRoundEndMessage((int)r.U32("round"), r.I64("pages"));
        r.End();
        if (m.Pages < 0) throw new ProtocolException($"StreamRoundEnd: negative page count {m.Pages}");
        return m;
    }
}
