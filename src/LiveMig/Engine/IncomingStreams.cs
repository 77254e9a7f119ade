using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Net.Sockets;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Reporting;

namespace LiveMig.Engine;

/// <summary>
/// The destination's data streams of one multi-stream migration (docs/protocol.md, "Several
/// data streams"). The control connection's thread (<see cref="IncomingMigration"/>) opens the
/// session when the source announces its streams; each data connection (first frame
/// StreamAttach) is served on its own connection thread, which places the pages it carries with
/// its own batch reader and decoder. Each stream's rounds are numbered in order and end with a
/// StreamRoundEnd; streams are not ordered against each other (a page's versions all travel on
/// one stream, so placing them in stream order places the last version last). The control thread
/// acknowledges a round's Sync only when every stream has ended that round, and answers Prepare
/// only when every stream has ended the final round and its thread has stopped. A stream that
/// breaks or carries garbage fails the whole migration; every wait is bounded by the I/O timeout
/// or woken by a failure.
/// </summary>
public sealed class IncomingStreams
{
    private sealed class Slot
    {
        public Stream? Stream;
        public FrameWriter? Frames;
        public PageBatchReader Placer = null!;
        public PipelineDecoder? Decoder;
        public int Ended = -1;       // last round this stream ended
        public long PagesInRound;    // pages placed in its open round (Ended + 1)
        public long BytesRead;
        public bool Attached, Exited;
    }

    private readonly ConcurrentDictionary<Guid, IncomingStreams> _sessions;
    private readonly Guid _id;
    private readonly Slot[] _slots;
    private readonly object _lock = new();
    private readonly TimeSpan _timeout;
    private readonly TimeProvider _time;
    private readonly Action<int, int>? _roundPlaced;
    private string? _failure;
    private bool _closing;
    private long _progressTs; // last batch placed or round ended, by any stream (set when made)
    private readonly PageBatchCheck _check; // of every data connection's PageBatch frames, as negotiated on the control one

    private IncomingStreams(ConcurrentDictionary<Guid, IncomingStreams> sessions, Guid id, int count, GuestMemory memory, PageHashes? hashes, PipelineDecoder? controlDecoder, Capabilities accepted,
        DedupStore? store, DestinationOptions options)
    {
        _sessions = sessions;
        _id = id;
        _timeout = options.IoTimeout;
        _time = options.Time;
        _progressTs = _time.GetTimestamp();
        _roundPlaced = options.StreamRoundPlaced;
        _check = PageBatchChecks.Of(accepted);
        _slots = new Slot[count];
        for (int i = 0; i < count; i++)
        {
            var placer = new PageBatchReader(memory) { Hashes = hashes };
            PipelineDecoder? decoder = null;
            if (controlDecoder is not null)
            {
                // Own decompressor and counters; the received-pages bitmap is shared (XBZRLE bases,
                // dedup holders and gang-filled pages are checked against it).
                decoder = new PipelineDecoder(memory, accepted, store, controlDecoder.Received) { IndexPlacedPages = controlDecoder.IndexPlacedPages };
                placer.Decoder = decoder;
            }
            _slots[i] = new Slot { Placer = placer, Decoder = decoder };
        }
    }

    public int Count => _slots.Length;

    /// <summary>Opens the session of migration <paramref name="id"/>; its data connections may attach from now on.</summary>
    public static IncomingStreams Open(DestinationSessions sessions, Guid id, int count, GuestMemory memory, PageHashes? hashes, PipelineDecoder? controlDecoder, Capabilities accepted,
        DedupStore? store, DestinationOptions options)
    {
        var s = new IncomingStreams(sessions.Streams, id, count, memory, hashes, controlDecoder, accepted, store, options);
        if (!sessions.Streams.TryAdd(id, s)) throw new ProtocolException($"Streams: migration {id} already has data streams here");
        return s;
    }

    /// <summary>Tells every stream's placer about each page it places (the prefaulter), or stops it (null).</summary>
    public void SetPlaced(Action<long>? placed)
    {
        foreach (var s in _slots) s.Placer.Placed = placed;
    }

    /// <summary>
    /// A connection whose first frame is StreamAttach: joins the migration it names and places
    /// the pages it carries until the migration is done with it. Returns when the stream is
    /// closed by the session (normal end) or has failed (the session then fails).
    /// </summary>
    public static void ServeAttach(DestinationSessions sessions, ReadOnlySpan<byte> payload, Stream stream, FrameReader reader, FrameWriter frames)
    {
        var m = StreamAttachMessage.Parse(payload);
        if (!sessions.Streams.TryGetValue(m.MigrationId, out var session))
            throw new ProtocolException($"StreamAttach: no multi-stream migration {m.MigrationId} is in progress here");
        session.Serve(m, stream, reader, frames);
    }

    private void Serve(StreamAttachMessage m, Stream stream, FrameReader reader, FrameWriter frames)
    {
        Slot slot;
        lock (_lock)
        {
            string? bad = m.Count != _slots.Length ? $"StreamAttach: stream count {m.Count} differs from the {_slots.Length} announced"
                : _slots[m.Index].Attached ? $"StreamAttach: data stream {m.Index} is already attached"
                : _closing ? $"StreamAttach: migration {m.MigrationId} is no longer taking data streams"
                : null;
            if (bad is not null)
            {
                FailLocked(bad);
                throw new ProtocolException(bad);
            }
            slot = _slots[m.Index];
            slot.Attached = true;
            slot.Stream = stream;
            slot.Frames = frames;
        }
        try
        {
            Span<byte> small = stackalloc byte[16];
            // Frames go unchecked only where TLS authenticates them: on every connection, or on none.
            if (_check == PageBatchCheck.None && !IncomingMigration.IsSecured(stream)) throw new ProtocolException($"data stream {m.Index} is not TLS, but the migration negotiated unchecked frames under TLS");
            reader.PageBatchCheck = _check;
            frames.Send(FrameType.StreamAttached, small[..new StreamAttachedMessage(m.Index).Write(small)]);
            Receive(m.Index, slot, reader);
        }
        catch (Exception e) when (e is ProtocolException or IOException or ObjectDisposedException or SocketException or InvalidOperationException)
        {
            bool closing;
            lock (_lock) closing = _closing;
            if (!closing)
            {
                string why = $"data stream {m.Index}: {e.Message}";
                Fail(why);
                if (e is ProtocolException)
                {
                    TrySendError(frames, why);
                    // Keep reading (and discarding) until the migration is torn down: the source's
                    // writes then go on, it reaches its next Sync or Prepare on the control
                    // connection and is told why there, instead of a reset connection here.
                    Drain(stream);
                }
            }
        }
        finally
        {
            lock (_lock)
            {
                slot.BytesRead = reader.BytesRead;
                slot.Exited = true;
                Monitor.PulseAll(_lock);
            }
        }
    }

    /// <summary>The stream's frames: PageBatch of its open round, StreamRoundEnd closing it, nothing else.</summary>
    private void Receive(int index, Slot slot, FrameReader reader)
    {
        while (true)
        {
            var type = reader.Read(out var payload);
            long frame = reader.FramesRead - 1;
            switch (type)
            {
                case FrameType.PageBatch:
                {
                    int open = Volatile.Read(ref slot.Ended) + 1;
                    if (payload.Length >= 4 && (int)BinaryPrimitives.ReadUInt32LittleEndian(payload) != open)
                        throw new ProtocolException($"PageBatch (frame {frame}) of round {BinaryPrimitives.ReadUInt32LittleEndian(payload)} while this stream's round {open} is open");
                    long before = slot.Placer.PagesPlaced;
                    slot.Placer.Apply(payload, frame, reader.EntryHashes);
                    slot.PagesInRound += slot.Placer.PagesPlaced - before;
                    Volatile.Write(ref _progressTs, _time.GetTimestamp());
                    break;
                }
                case FrameType.StreamRoundEnd:
                {
                    var end = StreamRoundEndMessage.Parse(payload);
                    int open = slot.Ended + 1;
                    if (end.Round != open) throw new ProtocolException($"StreamRoundEnd (frame {frame}) for round {end.Round} while this stream's round {open} is open");
                    if (end.Pages != slot.PagesInRound) throw new ProtocolException($"StreamRoundEnd (frame {frame}): round {end.Round} had {end.Pages} pages at the source, {slot.PagesInRound} arrived");
                    lock (_lock)
                    {
                        slot.Ended = end.Round;
                        slot.PagesInRound = 0;
                        Monitor.PulseAll(_lock);
                    }
                    _roundPlaced?.Invoke(index, end.Round);
                    break;
                }
                case FrameType.Error:
                    throw new ProtocolException($"source aborted the migration: {ErrorMessage.Parse(payload).Text}");
                default:
                    throw new ProtocolException($"unexpected {type} (frame {frame}) on a data connection");
            }
        }
    }

    /// <summary>
    /// Control thread, on Sync(round): waits until every stream has ended <paramref name="round"/>
    /// (a stream may already be further: streams are not ordered against each other). Times out
    /// when no stream has placed anything for the I/O timeout (a slow stream that progresses is
    /// waited for).
    /// </summary>
    public void WaitRound(int round)
    {
        long start = _time.GetTimestamp(), timeout = (long)(_timeout.TotalSeconds * _time.TimestampFrequency);
        lock (_lock)
        {
            while (true)
            {
                if (_failure is not null) throw new ProtocolException(_failure);
                int behind = Array.FindIndex(_slots, s => s.Ended < round);
                if (behind < 0) return;
                long left = Math.Max(start, Volatile.Read(ref _progressTs)) + timeout - _time.GetTimestamp();
                if (left <= 0)
                {
                    string why = _slots[behind].Attached
                        ? $"timed out: no data stream placed anything for {_timeout.TotalSeconds:0} s while data stream {behind} had not delivered round {round}"
                        : $"timed out after {_timeout.TotalSeconds:0} s: data stream {behind} never attached";
                    FailLocked(why);
                    throw new ProtocolException(why);
                }
                Monitor.Wait(_lock, TimeSpan.FromSeconds(Math.Min(1.0, (double)left / _time.TimestampFrequency)));
            }
        }
    }

    /// <summary>
    /// Control thread, on Prepare: waits until every stream has ended the final round, then
    /// closes the data connections and waits until no stream thread can touch memory any more.
    /// After it returns, every page any stream placed is in memory and in the hashes.
    /// </summary>
    public void Finish(int finalRound)
    {
        WaitRound(finalRound);
        CloseAndWait();
        lock (_lock)
        {
            if (_failure is not null) throw new ProtocolException(_failure);
            for (int i = 0; i < _slots.Length; i++)
            {
                var s = _slots[i];
                if (s.Ended != finalRound || s.PagesInRound != 0)
                    throw new ProtocolException($"data stream {i} sent pages after the final round {finalRound}");
            }
        }
    }

    /// <summary>Fails the session (any thread): the data connections close, the control thread's wait throws.</summary>
    public void Fail(string why)
    {
        lock (_lock) FailLocked(why);
    }

    private void FailLocked(string why)
    {
        _failure ??= why;
        Monitor.PulseAll(_lock);
    }

    /// <summary>Control thread, on any failure before Commit: stops every stream before the memory is discarded.</summary>
    public void Abort(string why)
    {
        lock (_lock) FailLocked(why);
        CloseAndWait();
    }

    private void CloseAndWait()
    {
        Stream?[] streams;
        lock (_lock)
        {
            _closing = true;
            streams = [.. _slots.Select(s => s.Stream)];
        }
        _sessions.TryRemove(new KeyValuePair<Guid, IncomingStreams>(_id, this));
        // Disposing a stream aborts a read blocked on it: its thread ends (quietly, as we are closing).
        foreach (var s in streams)
        {
            try { s?.Dispose(); }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException or NotSupportedException) { }
        }
        var deadline = _time.GetTimestamp() + (long)(_timeout.TotalSeconds * _time.TimestampFrequency);
        lock (_lock)
        {
            while (_slots.Any(s => s.Attached && !s.Exited))
            {
                long left = deadline - _time.GetTimestamp();
                if (left <= 0) throw new ProtocolException($"a data stream thread did not stop within {_timeout.TotalSeconds:0} s");
                Monitor.Wait(_lock, TimeSpan.FromSeconds(Math.Min(1.0, (double)left / _time.TimestampFrequency)));
            }
        }
    }

    /// <summary>Pages placed by every stream.</summary>
    public long PagesPlaced => _slots.Sum(s => s.Placer.PagesPlaced);

    public long BytesRead { get { lock (_lock) return _slots.Sum(s => s.BytesRead); } }

    public void AddCountersTo(EncodingCounters into) { foreach (var s in _slots) into.Merge(s.Placer.Counters); }

    /// <summary>The streams' decoder stage reports added to <paramref name="into"/> (the control connection's).</summary>
    public Dictionary<string, StageReport> MergeStages(Dictionary<string, StageReport> into)
    {
        foreach (var s in _slots)
        {
            if (s.Decoder is null) continue;
            foreach (var (name, r) in s.Decoder.Report())
            {
                if (!into.TryGetValue(name, out var a)) { into[name] = r; continue; }
                var counters = new Dictionary<string, long>(a.Counters);
                foreach (var (k, v) in r.Counters) counters[k] = counters.GetValueOrDefault(k) + v;
                into[name] = new StageReport
                {
                    PagesOffered = a.PagesOffered + r.PagesOffered, PagesEncoded = a.PagesEncoded + r.PagesEncoded, BytesIn = a.BytesIn + r.BytesIn,
                    BytesOut = a.BytesOut + r.BytesOut, BytesSaved = a.BytesSaved + r.BytesSaved, CpuMs = a.CpuMs + r.CpuMs, Counters = counters,
                };
            }
        }
        return into;
    }

    /// <summary>Releases the decoders (after <see cref="Finish"/> or <see cref="Abort"/>).</summary>
    public void DisposeDecoders()
    {
        foreach (var s in _slots) s.Decoder?.Dispose();
    }

    private static void Drain(Stream stream)
    {
        var scratch = new byte[64 << 10];
        try { while (stream.Read(scratch) > 0) { } }
        catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException or NotSupportedException or InvalidOperationException) { }
    }

    private static void TrySendError(FrameWriter frames, string text)
    {
        try
        {
            if (frames.IsOpen) frames.Abandon();
            Span<byte> buf = stackalloc byte[4100];
            frames.Send(FrameType.Error, buf[..new ErrorMessage(ErrorMessage.BadStream, text).Write(buf)]);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException or InvalidOperationException) { }
    }
}
