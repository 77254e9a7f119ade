using LiveMig.Memory;
using LiveMig.Policies;
using LiveMig.Protocol;
using LiveMig.Reporting;

namespace LiveMig.Simulation;

/// <summary>
/// The post-copy phase of one simulated migration, as <c>Engine/PostCopyMigration</c> runs it
/// from the pause on, event by event:
/// <list type="number">
/// <item>the switch: PostCopyStart, the pending-page bitmap (<see cref="PageBitmapChunks"/>' frames)
/// and the VM state on the network (capped as the engine's main connection is), then Ready and
/// Commit — the destination resumes the VM when Commit arrives (1.5 round trips after the bytes),
/// the source hears Resumed half a round trip later: the downtime is pause → Resumed;</item>
/// <item>the background push of every pending page in the order of the engine's own
/// <see cref="PrepagingOrder"/> (address order, a fault's neighbourhood next), claimed from the
/// pending bitmap as the engine's pusher claims them, at the link's max-min share (a flow per
/// chunk of a few milliseconds of pages);</item>
/// <item>demand faults: between chunks the guest (running at the destination) writes the pages its
/// dirty model says; each one still pending is a fault — claimed by the request server
/// (<see cref="PrepagingOrder.OnFault"/> told), answered after half a round trip and any request
/// ahead of it, one page's time on what the links have free (the request server charges the cap
/// but never waits for it; beside a push that fills the link, half the push's rate), and half a
/// round trip back — and the vCPUs wait that long (the guest's progress stalls by the wait ÷ vCPUs);</item>
/// <item>PostCopyEnd → PostCopyDone: one round trip after the last page.</item>
/// </list>
/// Each page goes out once (pushed or requested), so post-copy's bytes are the memory's whatever
/// the dirty rate. Assumed: the guest touches pages by the writes its dirty model makes and, when
/// the hand model has <c>reads</c>, by its reads (<see cref="ReadModel"/>); a page in a chunk on the
/// wire counts as arrived.
/// </summary>
internal sealed class SimPostCopy : IDisposable
{
    /// <summary>A push chunk is about this long on the wire: the time step at which faults steer the push order.</summary>
    public const double ChunkSeconds = 0.002;
    /// <summary>PostCopyStart's frame (header and message).</summary>
    private const int StartFrameBytes = FrameFormat.HeaderSize + 48;
    private const int StateChunkBytes = 60 << 10;

    private readonly EventScheduler _scheduler;
    private readonly FlowNetwork _network;
    private readonly SimVm _vm;
    private readonly SimRoute _route;
    private readonly SimMigrationOptions _options;
    private readonly NativePageBitmap _pending;
    private readonly PageBitmap _touched;
    private readonly PrepagingOrder _order;
    private readonly List<long> _latencies = [];
    private readonly List<long> _faulted = [];
    private Action _guestResumes = null!, _done = null!;
    private double _pushBytesPerPage, _requestBytesPerPage, _pushCpuPerPage, _rate, _faultBytes, _pushBytes, _requestBytes;
    private long _left, _lastCheck, _serverFreeAt;
    private int _chunkPages;
    private bool _pushing;
    private double? _readProgress; // the guest's progress at the last look for reads (null: not yet resumed here)

    public SimPostCopy(EventScheduler scheduler, FlowNetwork network, SimVm vm, SimRoute route, SimMigrationOptions options)
    {
        _scheduler = scheduler;
        _network = network;
        _vm = vm;
        _route = route;
        _options = options;
        _pending = new NativePageBitmap(vm.PageCount);
        _touched = new PageBitmap(vm.PageCount);
        _order = new PrepagingOrder(vm.PageCount, options.PostCopy.Prepaging);
        _rate = LinkRate;
    }

    public long PagesAtSwitch { get; private set; }
    public long SwitchBytes { get; private set; }
    public long PushBytes => (long)Math.Round(_pushBytes);
    public long RequestBytes => (long)Math.Round(_requestBytes);
    public long PagesPushed { get; private set; }
    public long PagesRequested => _latencies.Count;
    public long PagesPrepaged => _order.Prepaged;
    /// <summary>vCPU-seconds spent waiting for demanded pages (every fault's latency, summed).</summary>
    public double WaitSeconds { get; private set; }
    public long ResumedTs { get; private set; }
    public long DoneTs { get; private set; }
    public IReadOnlyDictionary<string, double> PagesByEncoding { get; private set; } = new Dictionary<string, double>();
    public long BytesOnWire => SwitchBytes + PushBytes + RequestBytes;

    private double Cap => _options.BandwidthCap > 0 ? _options.BandwidthCap : double.PositiveInfinity;
    private double LinkRate => Math.Min(Cap, _route.BottleneckBytesPerSecond);
    private long HalfTrip => EventScheduler.Nanoseconds(_route.Latency);

    /// <summary>
    /// The VM is paused with <paramref name="pendingAtSwitch"/> still to come; <paramref name="guestResumes"/>
    /// runs when the destination resumes it, <paramref name="done"/> when PostCopyDone is back.
    /// </summary>
    /// <param name="priced">The pages whose content the bytes are counted over (<paramref name="pendingAtSwitch"/>, or with the holes of the image it leaves out).</param>
    /// <param name="skipZero">Zero pages cost nothing (pure post-copy's image: its zero pages are holes).</param>
    public void Switch(PageBitmap pendingAtSwitch, PageBitmap priced, bool skipZero, int round, Action guestResumes, Action done)
    {
        _guestResumes = guestResumes;
        _done = done;
        _pending.CopyFrom(pendingAtSwitch);
        _left = PagesAtSwitch = _pending.Count();
        Price(priced, skipZero, round);
        long words = (_vm.PageCount + 63) / 64, bitmapFrames = (words + PageBitmapChunks.MaxWords - 1) / PageBitmapChunks.MaxWords;
        long state = _vm.StateBytes + (_vm.StateBytes + StateChunkBytes - 1) / StateChunkBytes * FrameFormat.HeaderSize;
        SwitchBytes = StartFrameBytes + words * 8 + bitmapFrames * (FrameFormat.HeaderSize + 12) + state;
        _network.Start(_route, SwitchBytes, _ =>
        {
            _scheduler.At(_scheduler.Now + 3 * HalfTrip, GuestResumes); // Ready back, Commit there
            _scheduler.At(_scheduler.Now + 4 * HalfTrip, ResumedAtSource);
        }, Cap);
    }

    /// <summary>
    /// Every pending page goes out once, whether pushed or requested: their bytes are counted once,
    /// through the push's stages (compression only, as the engine's pusher: nothing else may lean
    /// on the destination's pages now); a requested page goes as the request server sends it (raw
    /// or a zero marker).
    /// </summary>
    private void Price(PageBitmap priced, bool skipZero, int round)
    {
        long count = PagesAtSwitch;
        var sender = new SimRoundSender(_vm.Content, _options.Pipeline with { XbzrleCacheBytes = 0, Dedup = false }, _vm.PageCount)
        {
            WrittenPages = _vm.Guest.EverWritten,
            LinkEstimate = LinkRate,
        };
        var sent = sender.SendRound(round, final: true, priced, priced.Count(), skipZero, null, CancellationToken.None);
        PagesByEncoding = sender.PagesByEncoding;
        if (count == 0) return;
        _pushBytesPerPage = (double)sent.Bytes / count;
        _pushCpuPerPage = sender.LastCpuSeconds / count;
        double zero = Math.Min(count, sender.PagesByEncoding["zero"]);
        // Each request is answered at once in a batch of its own: its framing with it.
        _requestBytesPerPage = (zero * CodecModel.EntryHeaderBytes + (count - zero) * (CodecModel.EntryHeaderBytes + CodecModel.PageSize)) / count + CodecModel.BatchFramingBytes;
        _chunkPages = (int)Math.Clamp(LinkRate * ChunkSeconds / _pushBytesPerPage, Math.Max(1, _options.PostCopy.PushBatchPages), 4096);
    }

    private void GuestResumes()
    {
        _lastCheck = _scheduler.Now;
        _guestResumes();
        _readProgress = _vm.Guest.Progress; // reads fault from the resume at the destination on
    }

    private void ResumedAtSource()
    {
        ResumedTs = _scheduler.Now;
        _pushing = true;
        PushNext();
    }

    /// <summary>Serves the faults of the guest's work since the last chunk, then puts the next chunk (and the requested pages' bytes) on the network.</summary>
    private void PushNext()
    {
        ServeFaults();
        int n = 0;
        long p;
        while (n < _chunkPages && (p = _order.Next(_pending)) >= 0)
        {
            if (!_pending.TryClear(p)) continue;
            n++;
        }
        _left -= n;
        PagesPushed += n;
        double push = n * _pushBytesPerPage, bytes = push + _faultBytes;
        _pushBytes += push;
        _faultBytes = 0;
        if (bytes <= 0)
        {
            Finish();
            return;
        }
        double cpu = n * _pushCpuPerPage;
        _network.Start(_route, bytes, f =>
        {
            double took = (f.FinishedAt - f.StartedAt) / 1e9;
            if (took > 0 && push > 0) _rate = bytes / took;
            PushNext();
        }, cpu > 0 ? Math.Min(Cap, bytes / cpu) : Cap);
    }

    private void Finish()
    {
        _pushing = false;
        _scheduler.At(_scheduler.Now + 2 * HalfTrip, () =>
        {
            DoneTs = _scheduler.Now;
            _done();
        });
    }

    /// <summary>The pages the guest wrote since the last look that are still pending: each a fault, served as the engine's request server serves it.</summary>
    private void ServeFaults()
    {
        long now = _scheduler.Now, from = _lastCheck;
        _lastCheck = now;
        long touched0 = _left == 0 ? 0 : _vm.Guest.Harvest(_touched) + Reads();
        if (_left == 0 || touched0 == 0)
        {
            if (_left == 0) _touched.ClearAll();
            return;
        }
        ulong[] touched = _touched.Words;
        _faulted.Clear();
        for (long w = 0; w < touched.Length; w++)
        {
            ulong bits = touched[w];
            if (bits == 0) continue;
            touched[w] = 0;
            bits &= _pending.Word(w);
            while (bits != 0)
            {
                _faulted.Add(w * 64 + System.Numerics.BitOperations.TrailingZeroCount(bits));
                bits &= bits - 1;
            }
        }
        if (_faulted.Count > 0) Serve(from, now);
    }

    /// <summary>The pages the guest read since the last look (its progress since then), into the touched set: a read of a pending page faults as a write does.</summary>
    private long Reads()
    {
        double progress = _vm.Guest.Progress, from = _readProgress ?? progress;
        _readProgress = progress;
        return _vm.Reads is { } r ? r.Read(_vm.ReadDraws!, from, progress, _touched) : 0;
    }

    private void Serve(long from, long now)
    {
        int k = _faulted.Count;
        long pageTime = EventScheduler.Nanoseconds(_requestBytesPerPage / RequestRate());
        double wait = 0;
        for (int i = 0; i < k; i++)
        {
            long page = _faulted[i];
            _pending.TryClear(page);
            _order.OnFault(page);
            // The faults of the span, spread evenly over it; the request server answers them in turn.
            long at = from + (long)((now - from) * ((i + 0.5) / k));
            long start = Math.Max(at + HalfTrip, _serverFreeAt);
            _serverFreeAt = start + pageTime;
            long latency = _serverFreeAt + HalfTrip - at;
            _latencies.Add(latency);
            wait += latency / 1e9;
        }
        _left -= k;
        double bytes = k * _requestBytesPerPage;
        _requestBytes += bytes;
        _faultBytes += bytes;
        WaitSeconds += wait;
        _vm.Guest.Stall(wait / _vm.Guest.Vcpus);
    }

    /// <summary>
    /// How fast a requested page crosses: the engine's request server charges the cap but never
    /// waits for it, so a request gets what the route's links have free — and, beside a push
    /// that fills them, a fair share: half the push's rate.
    /// </summary>
    private double RequestRate()
    {
        double free = double.PositiveInfinity;
        foreach (var l in _route.Links) free = Math.Min(free, Math.Max(0, l.BytesPerSecond - l.CurrentRate));
        return Math.Max(free, (_pushing ? _rate : LinkRate) / 2);
    }

    /// <summary>The faults' latencies in microseconds (p50, p99, max), as the engine's report gives them.</summary>
    public LatencySummary FaultLatency()
    {
        if (_latencies.Count == 0) return new LatencySummary();
        var sorted = _latencies.ToArray();
        Array.Sort(sorted);
        long At(double q) => sorted[Math.Clamp((int)Math.Ceiling(q * sorted.Length) - 1, 0, sorted.Length - 1)];
        return new LatencySummary { P50 = At(0.5) / 1e3, P99 = At(0.99) / 1e3, Max = sorted[^1] / 1e3 };
    }

    public void Dispose() => _pending.Dispose();
}
