using System.Net.Sockets;
using LiveMig.Core;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// The source side of post-copy (Hines and Gopalan, VEE 2009) and hybrid migration. Hybrid runs
/// pre-copy rounds first, until <see cref="IPostCopySwitchPolicy"/> says switch. At the switch
/// the VM is paused, the destination is told which pages are still to come, gets the VM state and
/// resumes the VM at once; from then on the source pushes the remaining pages in the background
/// (main connection; order from <see cref="PrepagingOrder"/>) while a second connection carries
/// the destination's page requests and their answers, so a fault is never served behind bulk
/// data. Each page goes out once (a pending bitmap both threads claim from). After the switch
/// neither side alone has the whole VM: a broken connection is repaired by reconnecting (bounded
/// back-off) while the source keeps its paused memory; the destination says which pages it has
/// and the source sends the rest. Verification: the source's hash of its paused memory against
/// the destination's hashes of the pages as they were placed.
/// </summary>
public sealed class PostCopyMigration
{
    private readonly IVirtualMachine _vm;
    private readonly MigrationOptions _options;
    private IMigrationObserver _observer;
    private readonly IPreCopyPolicy? _rounds; // hybrid's round policy; null for pure post-copy
    private Guid _id = Guid.NewGuid();
    private bool _recovering; // a restarted source: the switch happened in an earlier process
    private readonly TimeProvider _time;
    private readonly Lock _serveLock = new();
    private readonly List<EncodingCounters> _counters = [];
    private readonly EncodingCounters _holes = new(); // holes at the switch: zero pages nobody sends
    private readonly LatencyRecorder _serveLatency = new();
    private NativePageBitmap? _pending;
    private PrepagingOrder? _order;
    private PageHashes? _hashes;
    private int _postCopyRound;
    private long _pagesPushed, _pagesRequested, _requestsForSentPages, _bytesOfClosedLinks;
    private int _networkFaults, _attempt;
    private bool _endSent;
    private Link? _currentLink;

    // One run's state.
    private RoundController? _controller;
    private EncodingCounters? _roundCounters;
    private SourcePipeline? _pipeline;
    private DateTimeOffset _started;
    private long _t0, _pausedAt, _resumedAt, _completedAt, _stateBytes;
    private bool _paused, _committed, _resumedSeen, _announceExtents;
    private PostCopyDoneMessage _done;
    private ulong _sourceHash;

    /// <param name="roundPolicy">Hybrid: the policy of the pre-copy rounds and of the switch (default <see cref="HybridPolicy"/>); ignored for pure post-copy.</param>
    public PostCopyMigration(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer = null, IPreCopyPolicy? roundPolicy = null)
    {
        if (options.Strategy == MigrationStrategy.PostCopy && (options.Pipeline.XbzrleCacheBytes > 0 || options.Pipeline.Dedup))
            throw new ArgumentException("post-copy sends each page once while the VM runs at the destination: XBZRLE deltas and dedup references have nothing safe to lean on (use hybrid)", nameof(options));
        if (options.Strategy != MigrationStrategy.PostCopy) BrakeCheck.Require(vm, options.PreCopy);
        if (vm.PostCopyRefusal is { } refusal) throw new ArgumentException($"VM {vm.Name} ({vm.Kind}): {refusal}", nameof(vm));
        _vm = vm;
        _options = options;
        _time = options.Time;
        _observer = observer ?? new NullObserver();
        if (options.Strategy == MigrationStrategy.Hybrid)
        {
            var hybrid = new HybridPolicy(options.PostCopy.Hybrid, options.PreCopy, options.Time);
            if (roundPolicy is not null || !hybrid.SwitchesAtOnce) _rounds = roundPolicy ?? hybrid;
        }
        else if (options.Strategy == MigrationStrategy.PreCopy)
        {
            // Pre-copy that may fall back to post-copy (--on-stall postcopy): its own policy, post-copy only on a stall.
            if (options.PreCopy.OnStall != StallAction.PostCopy) throw new ArgumentException("a pre-copy migration runs on PreCopyMigration unless it may switch to post-copy on a stall (PreCopyOptions.OnStall = PostCopy)", nameof(options));
            if (options.Streams > 1) throw new ArgumentException("pre-copy that may switch to post-copy uses one data connection", nameof(options));
            _rounds = roundPolicy ?? new PreCopyPolicy(options.PreCopy, options.Time);
        }
        Limiter = new RateLimiter(options.BandwidthLimit, options.Time);
    }

    private sealed class NullObserver : IMigrationObserver;

    public Guid MigrationId => _id;

    /// <summary>Who is told about progress; set before <see cref="Run"/>.</summary>
    public IMigrationObserver Observer { get => _observer; set => _observer = value ?? new NullObserver(); }
    public RateLimiter Limiter { get; }
    /// <summary>Makes each connection (kind, attempt number from 0); tests wrap streams here to inject faults. Default: TCP to the MigrateTo address.</summary>
    public Func<ChannelKind, int, Stream>? Connector { get; init; }

    private string StrategyName => Migrations.Name(_options.Strategy);

    /// <summary>Where reconnections go (set by <see cref="MigrateTo"/>); <see cref="ReconnectTarget.RetryNow"/> cuts a back-off short.</summary>
    public ReconnectTarget? Target { get; private set; }

    public MigrationReport MigrateTo(string host, int port, CancellationToken cancel = default)
    {
        var target = Target = new ReconnectTarget(host, port);
        var connect = Connector ?? ((kind, attempt) =>
        {
            var (h, p) = target.Current;
            return SourceConnection.Open(h, p, _options);
        });
        return Run(connect, cancel);
    }

    /// <summary>One migration's connections; <see cref="Break"/> closes both so every blocked call fails.</summary>
    private sealed class Link : IDisposable
    {
        public Link(Stream main, RateLimiter limiter, TimeSpan ioTimeout, TimeProvider time)
        {
            Main = main;
            if (main.CanTimeout) { main.ReadTimeout = (int)ioTimeout.TotalMilliseconds; main.WriteTimeout = (int)ioTimeout.TotalMilliseconds; }
            MainFrames = new FrameWriter(main, limiter, time);
            MainReader = new FrameReader(main);
        }

        public Stream Main { get; }
        public FrameWriter MainFrames { get; }
        public FrameReader MainReader { get; }
        public Stream? Priority { get; set; }
        public FrameWriter? PriorityFrames { get; set; }
        public FrameReader? PriorityReader { get; set; }
        public Thread? Server { get; set; }
        /// <summary>Why the request server stopped (it breaks the link, so the pusher only sees a closed stream).</summary>
        public Exception? ServerError { get; set; }
        public volatile bool Broken;

        public long BytesWritten => MainFrames.BytesWritten + (PriorityFrames?.BytesWritten ?? 0);

        public void Break()
        {
            Broken = true;
            try { Main.Dispose(); } catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException) { }
            try { Priority?.Dispose(); } catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException) { }
        }

        public void Dispose()
        {
            Break();
            if (Server is { } t && t != Thread.CurrentThread) t.Join();
            MainFrames.Dispose();
            MainReader.Dispose();
            PriorityFrames?.Dispose();
            PriorityReader?.Dispose();
        }
    }

    /// <summary>The request server stopped on a peer that broke the protocol: a failure, not a reason to reconnect.</summary>
    private static bool ServerSawProtocolError(Link link) => link.ServerError is { } e && !LinkFailure.Is(e) && e is not InvalidOperationException;

    private readonly SwitchGate _gate = new();

    /// <summary>Cancels unless the switch (or the stop-and-copy's Commit) has begun; the answer says which, decided atomically with it.</summary>
    public CancelOutcome TryCancel() => _gate.TryCancel();

    public MigrationReport Run(Func<ChannelKind, int, Stream> connect, CancellationToken outside = default)
    {
        _gate.Follow(outside);
        var cancel = _gate.Token;
        _started = _time.GetUtcNow();
        _t0 = _time.GetTimestamp();
        _switchClock = new PhaseClock(_time);
        Link? link = null;
        if (_options.Verify) _hashes = new PageHashes(_vm.Memory.PageCount);
        _pipeline = _options.Pipeline.IsBaseline ? null : new SourcePipeline(_options.Pipeline, _vm.Memory.PageCount, new LinkEstimate(Limiter), 1, _time);
        try
        {
            if (_recovering) return RecoverFromMemory(connect, cancel);
            _observer.Phase("handshake");
            try { _currentLink = link = new Link(connect(ChannelKind.Main, 0), Limiter, _options.IoTimeout, _time); }
            catch (Exception e) when (e is SocketException or IOException or AuthenticationFailedException)
            {
                string why = e is AuthenticationFailedException ? e.Message : $"cannot connect to the destination: {LinkFailure.Describe(e)}";
                throw new MigrationFailedException(why, Report(why, null), e);
            }
            // The switch's code compiles while the handshake (and hybrid's rounds) run, not in the downtime.
            var warmup = SwitchoverWarmup.ForPostCopySource(_vm);
            Handshake(link);
            OpenPriority(link, connect, 0);
            if (_rounds is not null && PreCopyRounds(link, cancel) is { } converged)
            {
                // The rounds met the target: pre-copy's switch-over, no post-copy phase at all.
                converged.PauseAndPrepare();
                if (!_gate.TryCommit()) throw new OperationCanceledException(cancel);
                converged.Commit();
                _completedAt = _resumedAt = converged.ResumedTimestamp;
                _observer.Phase("done");
                var done = Report(null, link);
                link.Dispose();
                return done;
            }
            ((IAsyncResult)warmup).AsyncWaitHandle.WaitOne(TimeSpan.FromSeconds(1)); // pure post-copy: a few ms before the pause
            if (_controller is null) { ProvisionDestination(link); ScanPopulated(); }
            StartServer(link); // before the pause: a thread start is not downtime (it serves requests only after PostCopyStart)
            var pendingAtSwitch = Switch(link); // kept for recovery: what the destination must end up with from us
            _observer.Phase("post-copy");
            try { link = PostCopy(link, connect, pendingAtSwitch, cancel); }
            catch (RestartRequested) { return StartOver(cancel); }
            _completedAt = _time.GetTimestamp();
            if (!_resumedSeen) _resumedAt = _completedAt;
            _observer.Phase("done");
            _vm.Stop();
            bool verified = !_options.Verify || _done.DestinationHash == _sourceHash;
            var report = Report(verified ? null : $"verification failed: destination pages hash {_done.DestinationHash:x16} as placed, the source's paused memory {_sourceHash:x16}", link);
            link.Dispose();
            // The destination's copy differs from this paused one: the VM is kept here, for the operator.
            if (!verified) return Paused(new MigrationAbort(report.Error!), null);
            return report;
        }
        catch (Exception e) when (e is not MigrationFailedException)
        {
            // Anything at all: no thread of this migration may outlive it (they read guest memory).
            // A request server that met a protocol violation closed the link: its error is the cause.
            if (LinkFailure.Is(e) && _currentLink is { } cl && ServerSawProtocolError(cl)) e = cl.ServerError!;
            // After the switch the VM exists whole only here: whatever failed, keep it and wait for the operator.
            if (_committed && e is not RecoveryFailed)
            {
                try { return Paused(e, link); }
                catch (RecoveryFailed abandoned) { e = abandoned; }
            }
            string why = Fail(e, link);
            throw new MigrationFailedException(why, Report(why, link), e);
        }
        finally
        {
            _gate.End();
            _pipeline?.Dispose();
            _zeroAfterResume?.Dispose(); // native memory, read only by this thread (ResolveLateZeros)
            _zeroAfterResume = null;
        }
    }

    /// <summary>
    /// A source restarted after the first one stopped past the switch (its process died): it has
    /// the paused memory (a file that outlived that process) and the migration's ID, and serves
    /// what the destination, which waited for it, still lacks — every page it does not hold —
    /// then verifies as post-copy always does.
    /// </summary>
    /// <param name="vm">The paused memory (e.g. <c>GuestMemory.Open</c> of the first source's memory file).</param>
    public static PostCopyMigration Recover(Guid migrationId, PausedMemoryVm vm, MigrationOptions options, IMigrationObserver? observer = null)
    {
        if (options.Pipeline.SkipFreePages)
            throw new ArgumentException("a recovered source cannot tell which free pages the destination holds as zero: recover without free-page skipping", nameof(options));
        var o = options with { Strategy = MigrationStrategy.PostCopy, Pipeline = options.Pipeline with { XbzrleCacheBytes = 0, Dedup = false } };
        return new PostCopyMigration(vm, o, observer) { _id = migrationId, _recovering = true };
    }

    private MigrationReport RecoverFromMemory(Func<ChannelKind, int, Stream> connect, CancellationToken cancel)
    {
        var memory = _vm.Memory;
        if (_hashes is not null) HashAll(memory, _hashes);
        _pending = new NativePageBitmap(memory.PageCount);
        _order = new PrepagingOrder(memory.PageCount, _options.PostCopy.Prepaging);
        _committed = true; // long ago, by the source that stopped
        var everything = new PageBitmap(memory.PageCount);
        everything.SetAll();
        _observer.Phase($"recovering migration {_id}: reattaching to the destination");
        var link = Reconnect(connect, everything, new IOException("the first source of this migration stopped after the switch"), ref _resumedSeen);
        _observer.Phase("post-copy");
        link = PostCopy(link, connect, everything, cancel);
        _completedAt = _time.GetTimestamp();
        if (!_resumedSeen) _resumedAt = _completedAt;
        _pausedNotes.Add($"recovered migration {_id} from the paused memory after its first source stopped past the switch");
        bool verified = !_options.Verify || _done.DestinationHash == _sourceHash;
        var report = Report(verified ? null : $"verification failed: destination pages hash {_done.DestinationHash:x16} as placed, the recovered memory {_sourceHash:x16}", link);
        link.Dispose();
        if (!verified) return Paused(new MigrationAbort(report.Error!), null);
        return report with { Escalations = [.. report.Escalations, .. _pausedNotes] };
    }

    /// <summary>Every page's verification hash, from memory that nothing writes (holes hash as zero pages).</summary>
    private static void HashAll(GuestMemory memory, PageHashes hashes)
    {
        foreach (var (first, count) in memory.DataExtents())
            for (long p = first; p < first + count; p++) hashes.Set(p, memory.Page(p));
    }

    /// <summary>
    /// The pre-copy phase of hybrid (or of pre-copy with <c>--on-stall postcopy</c>), on the same
    /// round controller as pre-copy (the page pipeline, Sync, hot-page deferral and the
    /// convergence aids included), on the main connection. Hybrid's policy always ends in the
    /// switch to post-copy; pre-copy's ends in a stop-and-copy when the rounds converge (returned,
    /// ready to run), the switch when they stall, or an abort.
    /// </summary>
    private StopAndCopy? PreCopyRounds(Link link, CancellationToken cancel)
    {
        if (!_vm.DirtyLog.IsTracking) _vm.DirtyLog.Start();
        var batches = new PageBatchWriter(link.MainFrames, _vm.Memory) { Hashes = _hashes };
        lock (_counters) _counters.Add(_roundCounters = batches.Counters);
        var sender = new ConnectionRoundSender(batches, _vm.DirtyLog, _observer, _time)
        {
            Bandwidth = () => Limiter.BytesPerSecond > 0 ? Limiter.BytesPerSecond : _controller!.Rounds.Count > 0 ? _controller.Rounds[0].BandwidthBytesPerSecond : 0,
        };
        sender.Bind(link.MainFrames, link.MainReader);
        sender.StateBytes = _vm.StateSizeHint;
        _controller = new RoundController(_rounds!, sender, _vm.DirtyLog, _vm, _time, _observer);
        var first = FirstRound.Choose(_vm, _pipeline, sender, _announceExtents);
        _controller.Begin(first);
        _observer.Phase("live");
        var d = _controller.RunLiveRounds(cancel);
        string stall = d.Stalled ? _controller.StallSummary(_options.PreCopy.DowntimeLimit) : "";
        switch (d.Ending)
        {
            case RoundsEnding.Abort:
                string why = $"{stall}; migration aborted, the VM keeps running on the source";
                _controller.Escalations.Add(why);
                throw new MigrationAbort(why);
            case RoundsEnding.StopAndCopy:
                if (d.Stalled) _controller.Escalations.Add($"{stall}; paused anyway, within the maximum downtime of {_options.PreCopy.MaxDowntime?.TotalMilliseconds:0} ms");
                return _stopAndCopy = new StopAndCopy(_vm, _controller, sender, _pipeline, _options.Verify, _time, _observer);
            default:
                if (d.Stalled) _controller.Escalations.Add($"{stall}; switched to post-copy");
                return null;
        }
    }

    private StopAndCopy? _stopAndCopy;

    // The post-copy switch's steps, from the pause to the Resumed acknowledgement (the report's downtimeBreakdown).
    private PhaseClock _switchClock = null!;
    private double _pauseBarrierMs;

    /// <summary>The switch: pause, say which pages are still to come, send the VM state, and commit once the destination is ready.</summary>
    private PageBitmap Switch(Link link)
    {
        Span<byte> small = stackalloc byte[64];
        _observer.Phase("paused");
        long asked = _time.GetTimestamp();
        _vm.Pause();
        _paused = true;
        _pausedAt = _time.GetTimestamp();
        _pauseBarrierMs = _time.GetElapsedTime(asked, _pausedAt).TotalMilliseconds;
        _switchClock.Start(_pausedAt);
        var pending = PendingAtSwitch();
        _pending = new NativePageBitmap(_vm.Memory.PageCount);
        _pending.CopyFrom(pending);
        long pendingCount = _pending.Count();
        _postCopyRound = _controller is null ? 0 : _controller.Round + 1;
        Volatile.Write(ref _order, new PrepagingOrder(_vm.Memory.PageCount, _options.PostCopy.Prepaging)); // last: the request server (already running) reads it first
        _switchClock.Mark("pending-set");
        var start = new PostCopyStartMessage(_postCopyRound, pendingCount, StopReasonName, AllCounters().Skipped);
        link.MainFrames.Send(FrameType.PostCopyStart, small[..start.Write(small)]);
        // LateZeros announcing every page: the count says it all, no bitmap follows.
        if (!(_lateZeros && pendingCount == _vm.Memory.PageCount)) PageBitmapChunks.Send(link.MainFrames, _pending);
        _switchClock.Mark("send-pending-pages");
        _stateBytes = VmStateChunks.Send(link.MainFrames, _vm.SaveState());
        _switchClock.Mark("save-vm-state");

        var type = link.MainReader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination aborted before the switch-over: {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.Ready) throw new ProtocolException($"expected Ready, got {type}");
        _switchClock.Mark("await-ready");
        // From here on the destination may run the VM: the source never resumes it.
        if (!_gate.TryCommit()) throw new OperationCanceledException(_gate.Token);
        link.MainFrames.Send(FrameType.Commit, []);
        Volatile.Write(ref _committed, true);
        _switchClock.Mark("send-commit");
        return pending;
    }

    /// <summary>
    /// What the destination lacks at the pause. Hybrid: the rounds' pending set with the last
    /// harvest. Post-copy: every populated page (holes are zero there already: counted, never sent).
    /// </summary>
    private PageBitmap PendingAtSwitch()
    {
        // The dirty log stops after the destination resumed (PostCopy): unregistering it is not downtime.
        if (_controller is not null)
        {
            _controller.ReleaseBrakes();
            _controller.HarvestFinal();
            return _controller.Pending;
        }
        // Populated before the pause (ScanPopulated), or written since.
        var pending = _populated!;
        _populated = null;
        if (_lateZeros)
        {
            // Nothing asked of the dirty log in the pause: every hole of the scan is announced as
            // still to come too, and those that stayed zero are told after the resume (ResolveLateZeros).
            _populatedAtScan = pending;
            var all = new PageBitmap(_vm.Memory.PageCount);
            all.SetAll();
            return all;
        }
        // Every page populated at the scan is pending anyway: only the holes of then need asking about.
        if (_holesAtScan is { } holes) _vm.DirtyLog.HarvestWithin(holes, pending);
        else _vm.DirtyLog.Harvest(pending);
        long populated = pending.Count();
        _holes.AddPages(PageEncoding.Zero, _vm.Memory.PageCount - populated);
        // Free pages are not to come: the destination keeps them zero (and both sides hash them as zero pages).
        if (_pipeline is { Options.SkipFreePages: true } p) p.SkipFreePages(free => _vm.ReportFreePages(free), pending, populated, _holes);
        return pending;
    }

    private PageBitmap? _populated;
    private bool _lateZeros; // capability LateZeros accepted: the scan's holes are announced pending and resolved after the resume
    private PageBitmap? _populatedAtScan; // LateZeros: the scan's populated pages, until the holes are resolved
    private NativePageBitmap? _zeroAfterResume; // LateZeros: the holes that stayed zero (sent on each page-request connection)

    /// <summary>
    /// Pure post-copy, before the pause: one Sync before any round. The destination makes what
    /// grows with the VM — its page-hash array, its parked vCPU threads — at the first frame after
    /// the Hello; without this frame that is PostCopyStart, and the 20–45 ms it takes here were
    /// downtime. Hybrid's rounds do it already.
    /// </summary>
    private void ProvisionDestination(Link link)
    {
        Span<byte> small = stackalloc byte[16];
        link.MainFrames.Send(FrameType.Sync, small[..new SyncMessage(SyncMessage.BeforeRounds).Write(small)]);
        var type = link.MainReader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination aborted: {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.SyncAck || SyncMessage.Parse(payload, "SyncAck").Round != SyncMessage.BeforeRounds)
            throw new ProtocolException($"expected SyncAck for the post-copy preamble, got {type}");
    }

    /// <summary>
    /// Pure post-copy, before the pause: the populated pages (one SEEK_DATA/SEEK_HOLE pair per
    /// extent: tens of milliseconds for a guest of scattered zero pages, which used to be
    /// downtime), with the dirty log tracking from before the scan, so a page the guest populates
    /// after it is in the last harvest at the pause.
    /// </summary>
    private void ScanPopulated()
    {
        if (!_vm.DirtyLog.IsTracking) _vm.DirtyLog.Start();
        _populated = new PageBitmap(_vm.Memory.PageCount);
        _holesAtScan = new List<(long First, long Count)>();
        long next = 0;
        foreach (var (first, count) in _vm.Memory.DataExtents())
        {
            _populated.SetRange(first, count);
            if (first > next) _holesAtScan.Add((next, first - next));
            next = first + count;
        }
        if (next < _vm.Memory.PageCount) _holesAtScan.Add((next, _vm.Memory.PageCount - next));
        // A walk per hole costs a system call each: past a few hundred, one walk of everything is cheaper.
        if (_holesAtScan.Count > MaxHoleWalks) _holesAtScan = null;
    }

    private const int MaxHoleWalks = 256;
    private List<(long First, long Count)>? _holesAtScan; // the holes at the scan, for the pause's harvest (null: harvest everything)

    /// <summary>After the switch: push every page still to come while the request server answers faults, end with PostCopyEnd; reconnect after any link failure.</summary>
    private Link PostCopy(Link link, Func<ChannelKind, int, Stream> connect, PageBitmap pendingAtSwitch, CancellationToken cancel)
    {
        Span<byte> small = stackalloc byte[64];
        while (true)
        {
            try
            {
                if (!_resumedSeen)
                {
                    var type = link.MainReader.Read(out var payload);
                    if (type == FrameType.Error) throw new MigrationAbort($"destination failed at resume: {ErrorMessage.Parse(payload).Text}");
                    if (type != FrameType.Resumed) throw new ProtocolException($"expected Resumed, got {type}");
                    _resumedSeen = true;
                    _resumedAt = _time.GetTimestamp();
                    _switchClock.Mark("await-resumed");
                }
                ResolveLateZeros(link, pendingAtSwitch);
                if (_vm.DirtyLog.IsTracking) _vm.DirtyLog.Stop(); // the paused VM writes nothing more: its log goes, after the downtime
                PushAll(link, cancel);
                // Every page is claimed; the server may still be sending its last answer.
                lock (_serveLock) _sourceHash = _hashes?.Combine() ?? 0;
                var end = new PostCopyEndMessage(_options.Verify, _sourceHash, Interlocked.Read(ref _pagesPushed), Interlocked.Read(ref _pagesRequested));
                // Set before sending: the destination may answer and close the page-request
                // connection at once, and the server must not take that for a failure.
                Volatile.Write(ref _endSent, true);
                link.MainFrames.Send(FrameType.PostCopyEnd, small[..end.Write(small)]);
                var t = link.MainReader.Read(out var p);
                if (t == FrameType.Error) throw new MigrationAbort($"destination failed in post-copy: {ErrorMessage.Parse(p).Text}");
                if (t != FrameType.PostCopyDone) throw new ProtocolException($"expected PostCopyDone, got {t}");
                _done = PostCopyDoneMessage.Parse(p);
                return link;
            }
            catch (Exception e) when (LinkFailure.Is(e) && !ServerSawProtocolError(link))
            {
                // Recovery: both connections go; the paused memory stays here until the destination has every page.
                _networkFaults++;
                CheckProgress(e);
                // Close both connections first: the server may be blocked reading a live
                // page-request connection (e.g. the main one timed out), and would never end.
                link.Break();
                if (link.Server is { } st && st != Thread.CurrentThread) st.Join();
                _observer.Phase($"recovering: {OneLine(link.ServerError is { } se && e is ObjectDisposedException ? se : e)}");
                _bytesOfClosedLinks += link.BytesWritten;
                Volatile.Write(ref _endSent, false);
                link.Dispose();
                link = Reconnect(connect, pendingAtSwitch, e, ref _resumedSeen);
            }
        }
    }

    /// <summary>
    /// A link that fails again and again right after reattaching, with no page delivered in
    /// between, is not a flaky network but a destination that cannot go on (e.g. its page-request
    /// reader rejects what it is sent): reconnecting at once each time would spin forever. After
    /// <see cref="MaxFailuresWithoutProgress"/> such failures in a row the source stops trying
    /// and keeps the paused VM for the operator, as for any failure reconnecting cannot mend.
    /// </summary>
    private void CheckProgress(Exception e)
    {
        long delivered = Interlocked.Read(ref _pagesPushed) + Interlocked.Read(ref _pagesRequested);
        _failuresWithoutProgress = delivered == _deliveredAtLastFailure ? _failuresWithoutProgress + 1 : 0;
        _deliveredAtLastFailure = delivered;
        if (_failuresWithoutProgress >= MaxFailuresWithoutProgress)
            throw new MigrationAbort($"the connection to the destination failed {_failuresWithoutProgress + 1} times in a row with no page delivered in between (last: {OneLine(e)}): reconnecting does not mend it");
    }

    private const int MaxFailuresWithoutProgress = 4;
    private int _failuresWithoutProgress;
    private long _deliveredAtLastFailure = -1;

    /// <summary>
    /// A failure after the switch that reconnecting cannot mend (the destination aborted, broke
    /// the protocol, or verification failed): the source keeps the paused VM, says so, and waits
    /// for the operator — start over elsewhere (the new migration's report) or discard
    /// (<see cref="RecoveryFailed"/>, which says what is lost).
    /// </summary>
    private MigrationReport Paused(Exception e, Link? link)
    {
        link?.Dispose();
        _currentLink?.Dispose();
        var target = Target ??= new ReconnectTarget("", 0);
        EnterPaused(target, $"the post-copy phase failed ({OneLine(e)})");
        return StartOver(default);
    }

    /// <summary>What a failure leaves: before Commit the VM runs on here; after it this source keeps the paused VM. Returns the reason.</summary>
    private string Fail(Exception e, Link? link)
    {
        string why = e is OperationCanceledException ? "migration cancelled" : e.Message;
        if (_stopAndCopy is { Committed: true })
        {
            link?.Dispose();
            return why + " — after Commit: the destination may have resumed the VM, so the source keeps it paused (never running on both)";
        }
        if (_committed)
        {
            link?.Dispose();
            _currentLink?.Dispose();
            if (e is RecoveryFailed) return why; // the operator's decision, which says what is lost
            return why + " — after the switch to post-copy: the destination runs the VM with part of its memory; this source keeps the paused VM and every page it has not sent";
        }
        // The destination never got Commit: it discards its copy, the VM carries on here.
        if (link is not null)
        {
            PreCopyMigration.TrySendError(link.MainFrames, e is OperationCanceledException ? ErrorMessage.Cancelled : ErrorMessage.BadStream, why);
            link.Dispose();
        }
        _vm.DirtyLog.Stop();
        _controller?.ReleaseBrakes();
        if (_paused) _vm.Resume();
        _stopAndCopy?.ResumeAfterDrop();
        return why;
    }

    /// <summary>Why the rounds ended (or none ran): the report's <c>stopReason</c>, also told to the destination at the switch.</summary>
    private string StopReasonName => _controller is null
        ? StopReasons.Name(_options.Strategy == MigrationStrategy.Hybrid ? StopReason.RoundBudget : StopReason.Immediate)
        : StopReasons.Name(_controller.Decision.Reason);

    /// <summary>The report, for success (<paramref name="error"/> null) and failure alike.</summary>
    private MigrationReport Report(string? error, Link? link)
    {
        bool completed = _completedAt != 0;
        long bytes = _bytesOfClosedLinks + (link?.BytesWritten ?? 0);
        var r = SourceReport.Common(_vm, _options, _id, StrategyName, Limiter, _controller, _pipeline) with
        {
            StartedAt = _started,
            Outcome = error is null ? "completed" : "failed",
            Error = error,
            TotalTimeMs = _time.GetElapsedTime(_t0, completed ? _completedAt : _time.GetTimestamp()).TotalMilliseconds,
            BytesOnWire = bytes,
            Bytes = SourceReport.Wire(bytes, AllCounters(), ZeroMarkersSent(), _stateBytes),
            PagesByEncoding = AllCounters().PagesByName(),
            PagesSent = (_controller?.PagesSent ?? 0) + Interlocked.Read(ref _pagesPushed) + Interlocked.Read(ref _pagesRequested),
            PagesPushed = Interlocked.Read(ref _pagesPushed),
            PagesRequested = Interlocked.Read(ref _pagesRequested),
            NetworkFaults = _networkFaults,
            StopReason = StopReasonName,
        };
        if (_stopAndCopy is not null) return _stopAndCopy.AddTo(r with { Bytes = SourceReport.Wire(bytes, AllCounters(), ZeroMarkersSent(), _stopAndCopy.StateBytes) }, _options.PreCopy.DowntimeLimit);
        if (!completed) return r;
        bool verifiedOk = error is null;
        return r with
        {
            DowntimeMs = _time.GetElapsedTime(_pausedAt, _resumedAt).TotalMilliseconds,
            DowntimeBreakdown = new DowntimeBreakdown { PauseBarrierMs = _pauseBarrierMs, Source = _switchClock.Phases, SourceJitMs = _switchClock.JitMs },
            TimeToResumeMs = _time.GetElapsedTime(_t0, _resumedAt).TotalMilliseconds,
            PostCopyMs = _time.GetElapsedTime(_resumedAt, _completedAt).TotalMilliseconds,
            PagesResent = Interlocked.Read(ref _requestsForSentPages),
            PagesPrepaged = _order?.Prepaged ?? 0,
            Verified = _options.Verify ? verifiedOk : null,
            SourceHash = _options.Verify ? $"{_sourceHash:x16}" : null,
            DestinationHash = _options.Verify ? $"{_done.DestinationHash:x16}" : null,
            Faults = _done.Faults,
            FaultLatencyUs = new LatencySummary { P50 = _done.P50Ns / 1000.0, P99 = _done.P99Ns / 1000.0, Max = _done.MaxNs / 1000.0 },
            RequestServiceUs = Summary(_serveLatency),
        };
    }

    private void Handshake(Link link)
    {
        Span<byte> small = stackalloc byte[512 + HelloMessage.MaxSpecBytes];
        // Sync: hybrid's rounds, and pure post-copy's preamble (ProvisionDestination); every stage asked for is required.
        var caps = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.PostCopy | Capabilities.RoundSync | (_options.Verify ? Capabilities.Verify : 0)
            | _options.Pipeline.Capabilities;
        // Late zeros only where the pause would ask the dirty log about the holes (pure post-copy), and free-page skipping does not need the harvest there.
        bool lateZeros = _rounds is null && !_recovering && !_options.Pipeline.SkipFreePages;
        var wanted = caps | (_rounds is not null ? Capabilities.Extents : 0) | (lateZeros ? Capabilities.LateZeros : 0);
        var hello = new HelloMessage(ProtocolVersion.Version, ProtocolVersion.MinSupported, wanted, caps,
            _vm.Memory.Size, GuestMemory.PageSize, _vm.VcpuCount, _id, _vm.Name, _vm.Kind, _vm.Spec); // the description a QEMU guest's destination starts its QEMU from
        link.MainFrames.SendNow(FrameType.Hello, small[..hello.Write(small)]);
        var type = link.MainReader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.HelloAck) throw new ProtocolException($"expected HelloAck, got {type}");
        var ack = HelloAckMessage.Parse(payload);
        if (ack.Overreach(hello) is { } overreach) throw new ProtocolException(overreach);
        if ((caps & ~ack.Accepted) != 0)
            throw new MigrationAbort($"destination does not support {StrategyName} migration (missing capabilities: {caps & ~ack.Accepted})");
        _announceExtents = (ack.Accepted & Capabilities.Extents) != 0;
        _lateZeros = lateZeros && (ack.Accepted & Capabilities.LateZeros) != 0;
    }

    /// <summary>Opens the page-request connection of <paramref name="link"/>.</summary>
    private void OpenPriority(Link link, Func<ChannelKind, int, Stream> connect, int attempt)
    {
        var s = connect(ChannelKind.Priority, attempt);
        link.Priority = s;
        if (s.CanTimeout) { s.WriteTimeout = (int)_options.IoTimeout.TotalMilliseconds; s.ReadTimeout = (int)_options.IoTimeout.TotalMilliseconds; }
        link.PriorityFrames = new FrameWriter(s, null, _time);
        link.PriorityReader = new FrameReader(s);
        Span<byte> buf = stackalloc byte[32];
        link.PriorityFrames.Send(FrameType.Attach, buf[..new AttachMessage(_id, ChannelKind.Priority).Write(buf)]);
        var type = link.PriorityReader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination refused the page-request connection: {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.Attached) throw new ProtocolException($"expected Attached on the page-request connection, got {type}");
        // Requests come only when a vCPU faults: an idle page-request connection is not a dead one.
        if (s.CanTimeout) s.ReadTimeout = Timeout.Infinite;
    }

    private void StartServer(Link link)
    {
        link.Server = new Thread(() => Serve(link)) { IsBackground = true, Name = "livemig-postcopy-serve" };
        link.Server.Start();
    }

    /// <summary>The page-request server: answers each request at once on the priority connection with the pages not sent yet.</summary>
    private void Serve(Link link)
    {
        Linux.Native.RaiseCurrentThread(); // a faulting vCPU waits on this thread (where permitted; docs/protocol.md)
        var frames = link.PriorityFrames!;
        var writer = new PageBatchWriter(frames, _vm.Memory) { Hashes = _hashes };
        lock (_counters) _counters.Add(writer.Counters);
        var pages = new long[PageRequestMessage.MaxPages];
        long pageCount = _vm.Memory.PageCount;
        try
        {
            while (!link.Broken)
            {
                var type = link.PriorityReader!.Read(out var payload);
                if (type != FrameType.PageRequest) throw new ProtocolException($"unexpected {type} on the page-request connection");
                long t0 = _time.GetTimestamp();
                int n = PageRequestMessage.Parse(payload, pageCount, pages);
                if (Volatile.Read(ref _order) is null) throw new ProtocolException("PageRequest before the switch to post-copy");
                lock (_serveLock)
                {
                    writer.BeginRound(_postCopyRound);
                    long b0 = frames.BytesWritten;
                    int sent = 0;
                    for (int i = 0; i < n; i++)
                    {
                        long p = pages[i];
                        _order!.OnFault(p);
                        // A page already pushed may still sit in the main connection (or in the
                        // destination's managed reader, which a garbage collection may hold while
                        // the faulting thread holds that collection up: docs/reliability.md). Send
                        // it again here: the fault is then resolved by the page-request connection
                        // alone. The memory is paused, so both copies are the same; the
                        // destination places whichever comes first.
                        bool first = _pending!.TryClear(p);
                        if (first) sent++;
                        else Interlocked.Increment(ref _requestsForSentPages);
                        writer.Add(p, skipZero: false, again: !first); // a page sent twice counts once
                    }
                    if (n > 0)
                    {
                        writer.Flush();
                        Limiter.Charge(frames.BytesWritten - b0); // counts against the cap, never waits for it
                        Interlocked.Add(ref _pagesRequested, sent);
                    }
                }
                _serveLatency.Record(_time.GetElapsedTime(t0));
            }
        }
        catch (Exception e) when (LinkFailure.Is(e) || e is InvalidOperationException or ProtocolException)
        {
            // Wakes the pusher (its writes fail) so that recovery starts. After PostCopyEnd the
            // destination closes this connection when it is done; if it still needed pages it
            // notices the failure itself and breaks the main connection. Before Commit there is
            // no pusher: the switch's own read finds the destination's Error (or its close),
            // which breaking the main connection under it would turn into "disposed object".
            link.ServerError ??= e;
            if (!Volatile.Read(ref _endSent) && Volatile.Read(ref _committed)) link.Break();
        }
    }

    /// <summary>
    /// LateZeros, after the resume: which of the scan's holes the guest wrote before the pause
    /// (the dirty log, asked now instead of in the pause) — those stay to be sent — and which stayed
    /// zero: those are neither pushed nor kept for a reconnection, and the destination is told on
    /// the page-request connection (once per connection), so their faults need no answer. A hole
    /// requested meanwhile was answered with its content (zero), which is what the destination has.
    /// </summary>
    private void ResolveLateZeros(Link link, PageBitmap pendingAtSwitch)
    {
        if (!_lateZeros) return;
        if (_zeroAfterResume is null)
        {
            var populated = _populatedAtScan!;
            var written = new PageBitmap(_vm.Memory.PageCount);
            if (_holesAtScan is { } holes) _vm.DirtyLog.HarvestWithin(holes, written);
            else _vm.DirtyLog.Harvest(written);
            var zeros = new NativePageBitmap(_vm.Memory.PageCount);
            long count = 0;
            for (long w = 0; w < zeros.WordCount; w++)
            {
                ulong z = ~(populated.Word(w) | written.Word(w));
                zeros.SetWord(w, z); // masks the last word's tail
                z = zeros.Word(w);
                count += System.Numerics.BitOperations.PopCount(z);
                pendingAtSwitch.SetWord(w, pendingAtSwitch.Word(w) & ~z);
                _pending!.ClearBits(w, z);
            }
            _holes.AddPages(PageEncoding.Zero, count);
            _zeroAfterResume = zeros;
            _populatedAtScan = null;
        }
        lock (_serveLock) PageBitmapChunks.Send(link.PriorityFrames!, _zeroAfterResume, FrameType.LateZeros);
    }

    /// <summary>Pushes every pending page on the main connection, in prepaging order, in small frames.</summary>
    private void PushAll(Link link, CancellationToken cancel)
    {
        var frames = link.MainFrames;
        var writer = new PageBatchWriter(frames, _vm.Memory) { Hashes = _hashes };
        if (_pipeline is { } pipeline && pipeline.Options.Compression != CompressionKind.None)
        {
            // Compression pays on a slow link; nothing else may lean on the destination's pages now.
            writer.Encoder = pipeline.CreateEncoder(compressionOnly: true);
            writer.Link = pipeline.Link;
        }
        lock (_counters) _counters.Add(writer.Counters);
        writer.BeginRound(_postCopyRound);
        // Pay the cap before claiming a batch, so a claimed page never sits in the limiter while it is requested.
        frames.Limiter = null;
        if (_options.PostCopy.PushSocketBuffer > 0 && link.Main is NetworkStream ns)
        {
            try { ns.Socket.SendBufferSize = _options.PostCopy.PushSocketBuffer; } catch (SocketException) { }
        }
        int batch = Math.Max(1, _options.PostCopy.PushBatchPages);
        int estimate = batch * (GuestMemory.PageSize + PageBatchWriter.EntryHeaderSize) + PageBatchWriter.BatchHeaderSize + FrameFormat.HeaderSize;
        long total = _pending!.Count(), done = 0, sinceProgress = 0;
        _observer.RoundStarted(_postCopyRound, total, final: true);
        while (true)
        {
            if (link.Broken) throw new IOException("connection to the destination lost");
            Limiter.Consume(estimate);
            long b0 = frames.BytesWritten;
            int n = 0;
            long p = 0;
            while (n < batch && (p = _order!.Next(_pending)) >= 0)
            {
                if (!_pending.TryClear(p)) continue; // the request server took it
                writer.Add(p, skipZero: false);
                n++;
            }
            writer.Flush();
            Limiter.Charge(frames.BytesWritten - b0 - estimate);
            Interlocked.Add(ref _pagesPushed, n);
            done += n;
            if ((sinceProgress += n) >= 256)
            {
                sinceProgress = 0;
                _observer.Progress(_postCopyRound, done, total, frames.BytesWritten);
            }
            if (p < 0) break;
        }
        _observer.Progress(_postCopyRound, done, total, frames.BytesWritten);
    }

    /// <summary>
    /// After the switch neither side alone has the whole VM, so this source never gives up on
    /// its own: it reconnects with bounded back-off for <see cref="PostCopyOptions.RecoveryTimeout"/>,
    /// then stays post-copy paused — keeping the paused VM and every page the destination lacks,
    /// still trying every <see cref="PostCopyOptions.MaxRetryDelay"/> — until it is back, or an
    /// operator decides (<see cref="ReconnectTarget.Abandon"/>, <see cref="ReconnectTarget.Restart"/>).
    /// A destination that answers it no longer holds the migration is not retried until told to.
    /// </summary>
    private Link Reconnect(Func<ChannelKind, int, Stream> connect, PageBitmap pendingAtSwitch, Exception cause, ref bool resumedSeen)
    {
        var target = Target ??= new ReconnectTarget("", 0);
        var backoff = new RetryBackoff(_options.PostCopy.FirstRetryDelay, _options.PostCopy.MaxRetryDelay, _options.PostCopy.RecoveryTimeout, _time);
        string last = OneLine(cause);
        bool paused = false, lost = false;
        var address = target.Current;
        while (true)
        {
            CheckDecision(target);
            if (!lost)
            {
                try { return TryReattach(connect, pendingAtSwitch, ref resumedSeen); }
                catch (Exception e) when (LinkFailure.Is(e)) { last = OneLine(e); }
                catch (MigrationAbort e)
                {
                    // The destination answered but no longer holds the migration (restarted, or it gave up).
                    (lost, last) = (true, e.Message);
                    EnterPaused(target, $"the destination no longer holds the VM ({e.Message})");
                }
            }
            if (!paused && !lost && !ReconnectTarget.WaitToRetry(backoff, target, default))
            {
                paused = true;
                EnterPaused(target, $"the destination has not come back within {_options.PostCopy.RecoveryTimeout.TotalSeconds:0.#} s (last: {last})");
            }
            if (paused || lost)
            {
                target.Reconnecting = true;
                target.Wake.WaitOne(_options.PostCopy.MaxRetryDelay);
                target.Reconnecting = false;
                // Told to try again (perhaps elsewhere): a destination that was lost gets another chance.
                if (target.Current != address) (lost, address) = (false, target.Current);
            }
        }
    }

    /// <summary>One reattach: connect, Attach, learn which pages the destination has (PendingPages…, Attached), reopen the page-request connection.</summary>
    private Link TryReattach(Func<ChannelKind, int, Stream> connect, PageBitmap pendingAtSwitch, ref bool resumedSeen)
    {
        var memory = _vm.Memory;
        Span<byte> buf = stackalloc byte[32];
        int attempt = ++_attempt;
        Link? link = null;
        try
        {
            link = new Link(connect(ChannelKind.Main, attempt), Limiter, _options.IoTimeout, _time);
            _currentLink = link;
            link.MainFrames.SendNow(FrameType.Attach, buf[..new AttachMessage(_id, ChannelKind.Main).Write(buf)]); // a handshake frame: not held back by the cap
            using var present = new NativePageBitmap(memory.PageCount);
            while (true)
            {
                var type = link.MainReader.Read(out var payload);
                if (type == FrameType.Error) throw new MigrationAbort($"destination refused to resume the migration: {ErrorMessage.Parse(payload).Text}");
                if (type == FrameType.PendingPages) { PageBitmapChunks.Apply(payload, present); continue; }
                if (type != FrameType.Attached) throw new ProtocolException($"expected the destination's page bitmap and Attached, got {type}");
                if (AttachedMessage.Parse(payload).Resumed) resumedSeen = true;
                break;
            }
            // Still to send: what was to come at the switch and the destination does not have.
            for (long w = 0; w < _pending!.WordCount; w++) _pending.SetWord(w, pendingAtSwitch.Words[w] & ~present.Word(w));
            _order!.Rewind();
            OpenPriority(link, connect, attempt);
            StartServer(link);
            _observer.Phase($"reconnected (attempt {attempt}): {_pending.Count()} pages still to send");
            _currentLink = link;
            var ok = link;
            link = null;
            return ok;
        }
        finally
        {
            if (link is not null) { _bytesOfClosedLinks += link.BytesWritten; link.Dispose(); }
        }
    }

    /// <summary>Post-copy paused: said once, in the progress and the report, with what the operator can do.</summary>
    private void EnterPaused(ReconnectTarget target, string why)
    {
        string line = $"post-copy paused: {why}; this source keeps the paused VM, all {_vm.Memory.PageCount} of its pages ({_pending!.Count()} of them not sent yet). " +
                      $"Recover with 'livemig migrate --resume {_id} [--to HOST:PORT]'; start over from the paused VM elsewhere with 'livemig migrate --resume {_id} --to HOST:PORT --restart' " +
                      $"(only if that destination is gone for good: what the VM did there since the switch is lost); or discard it with 'livemig destroy {_id}'";
        _pausedNotes.Add(line);
        _observer.Phase(line);
    }

    private readonly List<string> _pausedNotes = [];

    /// <summary>An operator's decision, while post-copy is paused: discard (fails the migration, saying what is lost) or start over elsewhere.</summary>
    private void CheckDecision(ReconnectTarget target)
    {
        if (target.Abandoned)
            throw new RecoveryFailed($"post-copy abandoned by the operator after the switch: the destination lacked {_pending!.Count()} of the VM's pages, which this source held; they are discarded with it");
        if (target.RestartRequested is { } to) throw new RestartRequested(to.Host, to.Port);
    }

    /// <summary>
    /// The operator declared the destination lost and named another: a fresh pre-copy migration
    /// of the paused VM (its state at the switch) to it. A failed attempt leaves the VM paused
    /// here — never resumed: only the operator may decide where it runs — and waits for the next
    /// decision. Abandoning fails the migration, saying what is lost.
    /// </summary>
    private MigrationReport StartOver(CancellationToken cancel)
    {
        var target = Target!;
        var options = _options with { Strategy = MigrationStrategy.PreCopy, Streams = 1, PreCopy = _options.PreCopy with { OnStall = StallAction.Abort } };
        while (true)
        {
            if (target.TakeRestart() is { } to)
            {
                _observer.Phase($"starting over from the paused VM to {to.Host}:{to.Port}");
                var again = new PreCopyMigration(_vm, options, _observer) { KeepPausedOnFailure = true };
                try
                {
                    var report = again.MigrateTo(to.Host, to.Port, cancel);
                    return report with
                    {
                        Escalations = [.. _pausedNotes, .. report.Escalations,
                            $"started over from the paused VM (its state at the switch) to {to.Host}:{to.Port} as migration {again.MigrationId}: what the VM did on the first destination since the switch is lost"],
                    };
                }
                catch (MigrationFailedException e) { EnterPaused(target, $"starting over at {to.Host}:{to.Port} failed ({OneLine(e)})"); }
            }
            CheckDecision(target);
            target.Wake.WaitOne(_options.PostCopy.MaxRetryDelay);
        }
    }

    /// <summary>Starting over from the paused VM, to another destination (<see cref="ReconnectTarget.Restart"/>).</summary>
    private sealed class RestartRequested(string host, int port) : Exception($"restart to {host}:{port}")
    {
        public string Host { get; } = host;
        public int Port { get; } = port;
    }

    private static string OneLine(Exception e) => (e is IOException or SocketException ? LinkFailure.Describe(e) : e.InnerException?.Message ?? e.Message).ReplaceLineEndings(" ");

    /// <summary>Every page counter of the migration: the rounds', the push's, the request server's, and the holes.</summary>
    private EncodingCounters AllCounters()
    {
        var sum = new EncodingCounters();
        sum.Merge(_holes);
        lock (_counters) foreach (var c in _counters) sum.Merge(c);
        return sum;
    }

    /// <summary>Zero markers actually sent: every zero page counted but the holes (round 0's, or those at the switch), which nobody sends.</summary>
    private long ZeroMarkersSent()
    {
        long holes = _holes.Pages(PageEncoding.Zero) + (_controller is null ? 0 : RoundZeroHoles);
        return Math.Max(0, AllCounters().Pages(PageEncoding.Zero) - holes);
    }

    /// <summary>Zero pages round 0 counted without sending (holes and, with skipZero, zero content): all its zeros but the markers the rounds sent.</summary>
    private long RoundZeroHoles => _roundCounters is null ? 0 : _roundCounters.Pages(PageEncoding.Zero) - _controller!.ZeroMarkers;

    private static LatencySummary Summary(LatencyRecorder r)
    {
        var (p50, p99, max) = r.Summary();
        return new LatencySummary { P50 = p50, P99 = p99, Max = max };
    }


    private sealed class RecoveryFailed(string message) : Exception(message);
}
