using LiveMig.Core;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Protocol;

namespace LiveMig.Engine;

/// <summary>
/// The real engine's <see cref="IRoundSender"/>: a round is RoundStart, the pages through the
/// batch writer and its encoder (or spread over several data streams), then RoundEnd; Sync waits
/// for the destination's SyncAck. Used by pre-copy and by hybrid's pre-copy rounds. It measures
/// the round trip of each Sync, whose minimum (a small round's Sync is almost a bare round trip)
/// stands for the two round trips of the switch-over in <see cref="SwitchoverCost"/>.
/// </summary>
internal sealed class ConnectionRoundSender(PageBatchWriter batches, IDirtyLog dirtyLog, IMigrationObserver observer, TimeProvider time) : IRoundSender
{
    private TimeSpan _minSync = TimeSpan.MaxValue;

    /// <summary>The connection in use (replaced when the migration reattaches after a drop).</summary>
    public FrameWriter Frames { get; private set; } = null!;
    public FrameReader Reader { get; private set; } = null!;
    public PageBatchWriter Batches => batches;
    /// <summary>Several data streams carry the pages when set; this connection then carries only the control frames.</summary>
    public SourceStreams? Streams { get; set; }
    /// <summary>The VM state's size as last seen (0 until known); its time on the wire is part of the switch-over's cost.</summary>
    public long StateBytes { get; set; }
    /// <summary>The bandwidth the state is sent at, bytes/s (0: unknown, the state's time is left out).</summary>
    public Func<double> Bandwidth { get; set; } = () => 0;

    public void Bind(FrameWriter frames, FrameReader reader)
    {
        Frames = frames;
        Reader = reader;
    }

    /// <summary>Bytes on the wire of this connection and the data streams.</summary>
    public long BytesWritten => Frames.BytesWritten + (Streams?.BytesWritten ?? 0);

    /// <summary>The page counters of the whole migration: this connection's and, with several streams, theirs added.</summary>
    public EncodingCounters Counters()
    {
        if (Streams is null) return batches.Counters;
        var sum = new EncodingCounters();
        sum.Merge(batches.Counters);
        Streams.AddCountersTo(sum);
        return sum;
    }

    private long Entries => Streams?.EntriesWritten ?? batches.EntriesWritten;

    public RoundSent SendRound(int round, bool final, PageBitmap pages, long count, bool skipZero, PageBitmap? rewritten, CancellationToken cancel)
    {
        Span<byte> small = stackalloc byte[16];
        long bytes0 = BytesWritten, entries0 = Entries, zero0 = Counters().Pages(PageEncoding.Zero);
        observer.RoundStarted(round, count, final);
        Frames.Send(FrameType.RoundStart, small[..new RoundStartMessage(round, final).Write(small)]);
        batches.BeginRound(round);
        long skipped;
        if (Streams is { } ds)
        {
            (long done, skipped) = ds.SendRound(round, pages, skipZero, rewritten, dirtyLog, d => observer.Progress(round, d, count, BytesWritten), cancel);
            observer.Progress(round, done, count, BytesWritten);
        }
        else
        {
            (_, skipped) = RoundPages.Send(pages, batches, skipZero, rewritten, dirtyLog, d => observer.Progress(round, d, count, Frames.BytesWritten), cancel);
        }
        // Round 0 leaves zero pages out (holes and zero content alike): no markers were sent.
        long zeroMarkers = skipZero ? 0 : Counters().Pages(PageEncoding.Zero) - zero0;
        return new RoundSent(Entries - entries0, BytesWritten - bytes0, zeroMarkers, skipped);
    }

    public void Sync(int round)
    {
        Span<byte> small = stackalloc byte[16];
        long t0 = time.GetTimestamp();
        Frames.Send(FrameType.Sync, small[..new SyncMessage(round).Write(small)]);
        var type = Reader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination aborted: {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.SyncAck || SyncMessage.Parse(payload, "SyncAck").Round != round) throw new ProtocolException($"expected SyncAck for round {round}, got {type}");
        var took = time.GetElapsedTime(t0);
        if (took < _minSync) _minSync = took;
    }

    public void EndRound(RoundStats s)
    {
        Span<byte> small = stackalloc byte[64];
        var m = new RoundEndMessage(s.Round, s.PagesSent, s.DirtyPagesAfter, s.BytesSent, (long)s.Duration.TotalMicroseconds);
        Frames.Send(FrameType.RoundEnd, small[..m.Write(small)]);
    }

    /// <summary>Two round trips (Prepare → Ready, Commit → Resumed) at the smallest Sync seen, and the VM state at the bandwidth.</summary>
    public TimeSpan SwitchoverCost
    {
        get
        {
            var trips = _minSync == TimeSpan.MaxValue ? TimeSpan.Zero : _minSync * 2;
            double bw = Bandwidth();
            return bw > 0 && StateBytes > 0 ? trips + TimeSpan.FromSeconds(StateBytes / bw) : trips;
        }
    }
}
