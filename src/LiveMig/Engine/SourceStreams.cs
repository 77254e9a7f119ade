using System.Numerics;
using System.Net.Sockets;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Transport;

namespace LiveMig.Engine;

/// <summary>
/// The source's data streams of a multi-stream pre-copy migration (like QEMU's multifd): N data
/// connections beside the control connection, each with its own thread, frame writer, batch
/// writer and encoder. Page p always travels on stream (p / 64) mod N (<see cref="StreamLayout"/>),
/// so every version of a page goes down one connection in order. A round: the migration thread
/// posts the page bitmap; each worker walks the bitmap words of its own chunks (a word is a
/// chunk), encodes and sends, then ends its part of the round with a StreamRoundEnd frame.
/// Shared: the rate limiter (a thread-safe token bucket), the verification hashes (one slot per
/// page: distinct pages per stream), the pipeline's XBZRLE cache (sharded, locked) and dedup
/// index (holders per stream). Per stream: counters, summed for the report.
/// Failure of any stream fails the round (and so the migration); every connection is closed
/// and every worker joined before <see cref="Dispose"/> returns.
/// </summary>
internal sealed class SourceStreams : IDisposable
{
    private sealed class Worker(int index, Stream stream, FrameWriter frames, FrameReader reader, PageBatchWriter batches)
    {
        public readonly int Index = index;
        public readonly Stream Stream = stream;
        public readonly FrameWriter Frames = frames;
        public readonly FrameReader Reader = reader;
        public readonly PageBatchWriter Batches = batches;
        public Thread? Thread;
        public long Done;     // pages handled in the current round (progress; written by the worker)
        public long Skipped;  // pages skipped as re-written in the current round
    }

    private sealed record Job(int Round, PageBitmap Pages, bool SkipZero, PageBitmap? SkipRewrittenInto, IDirtyLog Log);

    private readonly Worker[] _workers;
    private readonly object _lock = new();
    private Job? _job;
    private int _generation;
    private int _running;
    private bool _stop;
    private volatile bool _abort;
    private string? _failure;
    private bool _disposed;

    private SourceStreams(Worker[] workers) => _workers = workers;

    public int Count => _workers.Length;

    /// <summary>Bytes written on the data connections so far (headers included).</summary>
    public long BytesWritten { get { long n = 0; foreach (var w in _workers) n += w.Frames.BytesWritten; return n; } }

    public long EntriesWritten { get { long n = 0; foreach (var w in _workers) n += w.Batches.EntriesWritten; return n; } }

    /// <summary>The streams' encoding counters added up (call between rounds).</summary>
    public void AddCountersTo(EncodingCounters into) { foreach (var w in _workers) into.Merge(w.Batches.Counters); }

    /// <summary>
    /// Announces <paramref name="count"/> data streams on the control connection, waits for the
    /// destination's StreamsAck, then opens and attaches each data connection.
    /// </summary>
    public static SourceStreams Open(int count, Guid id, FrameWriter control, FrameReader controlReader, Func<int, Stream> connect,
        GuestMemory memory, RateLimiter limiter, PageHashes? hashes, SourcePipeline? pipeline, TimeSpan ioTimeout, PageBatchCheck check = PageBatchCheck.Bytes)
    {
        Span<byte> small = stackalloc byte[64];
        control.Send(FrameType.Streams, small[..new StreamsMessage(count).Write(small)]);
        var type = controlReader.Read(out var payload);
        if (type == FrameType.Error) throw new ProtocolException($"destination {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.StreamsAck) throw new ProtocolException($"expected StreamsAck, got {type}");
        if (StreamsMessage.Parse(payload, "StreamsAck").Count != count) throw new ProtocolException("StreamsAck names another stream count");

        var workers = new List<Worker>();
        try
        {
            for (int i = 0; i < count; i++)
            {
                Stream s;
                try { s = connect(i); }
                catch (Exception e) when (e is SocketException or AuthenticationFailedException)
                {
                    throw new IOException($"cannot open data stream {i}: {e.Message}", e);
                }
                if (s.CanTimeout)
                {
                    s.ReadTimeout = (int)ioTimeout.TotalMilliseconds;
                    s.WriteTimeout = (int)ioTimeout.TotalMilliseconds;
                }
                var frames = new FrameWriter(s, limiter);
                frames.SendOnOwnThread();
                var reader = new FrameReader(s);
                // A data connection is secured like the control one, so the check negotiated there holds here.
                var batches = new PageBatchWriter(frames, memory) { Hashes = hashes, Check = check };
                if (pipeline is not null && pipeline.Options.Capabilities != 0)
                {
                    batches.Encoder = pipeline.CreateEncoder();
                    batches.Link = pipeline.Link;
                }
                var w = new Worker(i, s, frames, reader, batches);
                workers.Add(w);
                frames.SendNow(FrameType.StreamAttach, small[..new StreamAttachMessage(id, i, count).Write(small)]);
                type = reader.Read(out payload);
                if (type == FrameType.Error) throw new ProtocolException($"destination refused data stream {i}: {ErrorMessage.Parse(payload).Text}");
                if (type != FrameType.StreamAttached || StreamAttachedMessage.Parse(payload).Index != i)
                    throw new ProtocolException($"expected StreamAttached for data stream {i}, got {type}");
            }
        }
        catch
        {
            foreach (var w in workers) Close(w);
            throw;
        }
        var streams = new SourceStreams([.. workers]);
        foreach (var w in streams._workers)
        {
            w.Thread = new Thread(() => streams.WorkerLoop(w)) { IsBackground = true, Name = $"livemig-stream-{w.Index}" };
            w.Thread.Start();
        }
        return streams;
    }

    /// <summary>
    /// Sends one round's pages on every stream and waits until each stream has sent its share
    /// and its StreamRoundEnd. Calls <paramref name="progress"/> (pages handled so far) about
    /// every 50 ms from this thread. Returns the pages handled and those skipped as re-written.
    /// </summary>
    public (long Done, long Skipped) SendRound(int round, PageBitmap pages, bool skipZero, PageBitmap? skipRewrittenInto, IDirtyLog log,
        Action<long> progress, CancellationToken cancel)
    {
        lock (_lock)
        {
            if (_failure is not null) throw new ProtocolException(_failure);
            _job = new Job(round, pages, skipZero, skipRewrittenInto, log);
            _running = _workers.Length;
            _generation++;
            Monitor.PulseAll(_lock);
        }
        bool cancelled = false;
        while (true)
        {
            lock (_lock)
            {
                if (_running == 0) break;
                Monitor.Wait(_lock, 50);
                if (_running == 0) break;
            }
            if (!cancelled && cancel.IsCancellationRequested)
            {
                // Stop the workers at their next chunk; wait for them, then report the cancellation.
                cancelled = true;
                _abort = true;
            }
            progress(Done);
        }
        long skipped = 0;
        foreach (var w in _workers) skipped += w.Skipped;
        if (cancelled) throw new OperationCanceledException(cancel);
        // The failing stream's own message (a cut connection, or what the destination said on it).
        lock (_lock) if (_failure is not null) throw new ProtocolException(_failure);
        return (Done, skipped);
    }

    private long Done { get { long n = 0; foreach (var w in _workers) n += Volatile.Read(ref w.Done); return n; } }

    private void WorkerLoop(Worker w)
    {
        int seen = 0;
        while (true)
        {
            Job job;
            lock (_lock)
            {
                while (_generation == seen && !_stop) Monitor.Wait(_lock);
                if (_stop) return;
                seen = _generation;
                job = _job!;
            }
            try
            {
                SendShare(w, job);
            }
            catch (Exception e)
            {
                Fail(w, e);
            }
            lock (_lock)
            {
                _running--;
                Monitor.PulseAll(_lock);
            }
        }
    }

    /// <summary>One worker's share of a round: the chunks c with c mod N = its index, then StreamRoundEnd.</summary>
    private void SendShare(Worker w, Job job)
    {
        Volatile.Write(ref w.Done, 0);
        w.Skipped = 0;
        var batches = w.Batches;
        batches.BeginRound(job.Round);
        long entries0 = batches.EntriesWritten;
        ulong[] words = job.Pages.Words;
        int n = _workers.Length;
        long done = 0, skipped = 0;
        for (long c = w.Index; c < words.Length; c += n)
        {
            if (_abort) throw new OperationCanceledException();
            ulong word = words[c];
            if (word == 0) continue;
            long basePage = c << 6;
            while (word != 0)
            {
                long p = basePage + BitOperations.TrailingZeroCount(word);
                word &= word - 1;
                if (job.SkipRewrittenInto is { } pending && job.Log.WrittenSinceHarvest(p))
                {
                    pending.Set(p); // atomic: the migration thread reads it after the round; words are per stream anyway
                    skipped++;
                }
                else
                {
                    batches.Add(p, job.SkipZero);
                }
                done++;
            }
            Volatile.Write(ref w.Done, done);
        }
        batches.Flush();
        w.Skipped = skipped;
        Span<byte> small = stackalloc byte[16];
        w.Frames.Send(FrameType.StreamRoundEnd, small[..new StreamRoundEndMessage(job.Round, batches.EntriesWritten - entries0).Write(small)]);
    }

    private void Fail(Worker w, Exception e)
    {
        bool first;
        lock (_lock) first = _failure is null && !_abort;
        if (!first) return; // a consequence of the first failure (its connection was closed) or of a cancellation
        string why = e switch
        {
            IOException io => DestinationError(w) ?? $"data stream {w.Index}: connection to the destination failed: {LinkFailure.Describe(io)}",
            ObjectDisposedException => $"data stream {w.Index}: connection closed",
            _ => $"data stream {w.Index}: {e.Message}",
        };
        lock (_lock)
        {
            if (_failure is not null) return;
            _failure = why;
        }
        // One stream failed: the migration fails. Stop the others now rather than let them send on.
        _abort = true;
        foreach (var other in _workers) if (other != w) Close(other);
    }

    /// <summary>After a failed write the destination may have said why on this connection before closing it.</summary>
    private static string? DestinationError(Worker w)
    {
        try
        {
            if (w.Stream.CanTimeout) w.Stream.ReadTimeout = 1000;
            if (w.Reader.Read(out var payload) == FrameType.Error) return $"data stream {w.Index}: destination aborted: {ErrorMessage.Parse(payload).Text}";
        }
        catch (Exception e) when (e is IOException or ProtocolException or ObjectDisposedException or InvalidOperationException or NotSupportedException) { }
        return null;
    }

    private static void Close(Worker w)
    {
        try { w.Stream.Dispose(); }
        catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException or NotSupportedException) { }
    }

    /// <summary>Closes every data connection and joins every worker (none outlives the migration).</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            _stop = true;
            _abort = true;
            Monitor.PulseAll(_lock);
        }
        foreach (var w in _workers) Close(w);
        foreach (var w in _workers)
        {
            w.Thread?.Join();
            w.Frames.Dispose();
            w.Reader.Dispose();
            // The encoders belong to the SourcePipeline, which disposes them.
        }
    }
}
