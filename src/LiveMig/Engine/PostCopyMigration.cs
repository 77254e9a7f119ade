using System.Diagnostics;
using System.Net.Sockets;
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
    private readonly IMigrationObserver _observer;
    private readonly IPostCopySwitchPolicy _switch;
    private readonly Guid _id = Guid.NewGuid();
    private readonly List<RoundReport> _rounds = [];
    private readonly Lock _serveLock = new();
    private readonly List<EncodingCounters> _counters = [];
    private readonly LatencyRecorder _serveLatency = new();
    private NativePageBitmap? _pending;
    private PrepagingOrder? _order;
    private PageHashes? _hashes;
    private int _postCopyRound;
    private long _pagesPushed, _pagesRequested, _requestsForSentPages, _bytesOfClosedLinks;
    /// <summary>Zero pages counted but never sent: holes, and the zero pages round 0 leaves out (hybrid).</summary>
    private long _unsentZeros;
    private int _networkFaults, _attempt;
    private bool _endSent;
    private Link? _currentLink;

    public PostCopyMigration(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer = null, IPostCopySwitchPolicy? switchPolicy = null)
    {
        _vm = vm;
        _options = options;
        _observer = observer ?? new NullObserver();
        _switch = switchPolicy ?? (options.Strategy == MigrationStrategy.Hybrid
            ? new HybridPolicy(options.PostCopy.Hybrid, options.Time)
            : new PostCopyPolicy());
        Limiter = new RateLimiter(options.BandwidthLimit);
    }

    private sealed class NullObserver : IMigrationObserver;

    public Guid MigrationId => _id;
    public RateLimiter Limiter { get; }
    /// <summary>Makes each connection (kind, attempt number from 0); tests wrap streams here to inject faults. Default: TCP to the MigrateTo address.</summary>
    public Func<ChannelKind, int, Stream>? Connector { get; init; }
    /// <summary>Stopwatch timestamps of the pause, of the destination's resume acknowledgement, and of the end (0 until then).</summary>
    public long PausedAt { get; private set; }
    public long ResumedAt { get; private set; }
    public long CompletedAt { get; private set; }

    private string StrategyName => _options.Strategy == MigrationStrategy.Hybrid ? "hybrid" : "postcopy";

    /// <summary>Where reconnections go (set by <see cref="MigrateTo"/>); <see cref="ReconnectTarget.RetryNow"/> cuts a back-off short.</summary>
    public ReconnectTarget? Target { get; private set; }

    public MigrationReport MigrateTo(string host, int port, CancellationToken cancel = default)
    {
        var target = Target = new ReconnectTarget(host, port);
        var connect = Connector ?? ((kind, attempt) =>
        {
            var (h, p) = target.Current;
            return SourceConnection.Open(h, p, _options.Security, _options.IoTimeout);
        });
        return Run(connect, cancel);
    }

    /// <summary>One migration's connections; <see cref="Break"/> closes both so every blocked call fails.</summary>
    private sealed class Link : IDisposable
    {
        public Link(Stream main, RateLimiter limiter, TimeSpan ioTimeout)
        {
            Main = main;
            if (main.CanTimeout) { main.ReadTimeout = (int)ioTimeout.TotalMilliseconds; main.WriteTimeout = (int)ioTimeout.TotalMilliseconds; }
            MainFrames = new FrameWriter(main, limiter);
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

    public MigrationReport Run(Func<ChannelKind, int, Stream> connect, CancellationToken cancel = default)
    {
        var started = DateTimeOffset.UtcNow;
        long t0 = Stopwatch.GetTimestamp();
        var memory = _vm.Memory;
        Link? link = null;
        bool paused = false, committed = false;
        long stateBytes = 0, pagesInRounds = 0;
        SwitchDecision decision = default;
        PostCopyDoneMessage done = default;
        ulong sourceHash = 0;
        Span<byte> small = stackalloc byte[512];
        if (_options.Verify) _hashes = new PageHashes(memory.PageCount);
        try
        {
            _observer.Phase("handshake");
            try { _currentLink = link = new Link(connect(ChannelKind.Main, 0), Limiter, _options.IoTimeout); }
            catch (Exception e) when (e is SocketException or IOException or AuthenticationFailedException)
            {
                string why = e is AuthenticationFailedException ? e.Message : $"cannot connect to the destination: {e.Message}";
                throw new MigrationFailedException(why, BaseReport() with { Outcome = "failed", Error = why, StartedAt = started }, e);
            }
            Handshake(link, small);
            OpenPriority(link, connect, 0);

            decision = _switch.BeforeFirstRound();
            PageBitmap? toSend = null;
            int round = 0;
            if (!decision.Switch)
            {
                // Hybrid: pre-copy rounds on the main connection, exactly as PreCopyMigration does them.
                if (!_vm.DirtyLog.IsTracking) _vm.DirtyLog.Start();
                toSend = new PageBitmap(memory.PageCount);
                long toSendCount = memory.MarkPopulated(toSend);
                var batches = new PageBatchWriter(link.MainFrames, memory) { Hashes = _hashes };
                _counters.Add(batches.Counters);
                batches.Counters.AddPages(PageEncoding.Zero, memory.PageCount - toSendCount);
                _observer.Phase("live");
                while (true)
                {
                    cancel.ThrowIfCancellationRequested();
                    var stats = SendRound(round, toSend, toSendCount, link.MainFrames, batches, skipZero: round == 0, cancel);
                    if (round == 0) _unsentZeros = batches.Counters.Pages(PageEncoding.Zero);
                    pagesInRounds += stats.PagesSent;
                    toSend.ClearAll();
                    toSendCount = _vm.DirtyLog.Harvest(toSend);
                    stats = stats with { DirtyPagesAfter = toSendCount, DirtyRatePagesPerSecond = toSendCount / Math.Max(stats.Duration.TotalSeconds, 1e-6) };
                    var m = new RoundEndMessage(stats.Round, stats.PagesSent, stats.DirtyPagesAfter, stats.BytesSent, (long)stats.Duration.TotalMicroseconds);
                    link.MainFrames.Send(FrameType.RoundEnd, small[..m.Write(small)]);
                    decision = _switch.AfterRound(stats);
                    Record(stats);
                    round++;
                    if (decision.Switch) break;
                }
            }

            // The switch: pause, say which pages are still to come, send the VM state.
            _observer.Phase("paused");
            _vm.Pause();
            paused = true;
            PausedAt = Stopwatch.GetTimestamp();
            var pendingBits = toSend ?? new PageBitmap(memory.PageCount);
            if (toSend is not null) { _vm.DirtyLog.Harvest(toSend); _vm.DirtyLog.Stop(); }
            else
            {
                // Pure post-copy: every populated page is to come (holes are zero there already: counted, never sent).
                long populated = memory.MarkPopulated(pendingBits);
                var holes = new EncodingCounters();
                holes.AddPages(PageEncoding.Zero, memory.PageCount - populated);
                _unsentZeros = memory.PageCount - populated;
                lock (_counters) _counters.Add(holes);
            }
            _pending = new NativePageBitmap(memory.PageCount);
            _pending.CopyFrom(pendingBits);
            var pendingAtSwitch = pendingBits; // kept for recovery: what the destination must end up with from us
            long pendingCount = _pending.Count();
            _postCopyRound = round;
            _order = new PrepagingOrder(memory.PageCount, _options.PostCopy.Prepaging);
            var start = new PostCopyStartMessage(round, pendingCount, HybridPolicy.Name(decision.Reason));
            link.MainFrames.Send(FrameType.PostCopyStart, small[..start.Write(small)]);
            PageBitmapChunks.Send(link.MainFrames, _pending);
            byte[] state = _vm.SaveState();
            stateBytes = VmStateChunks.Send(link.MainFrames, state);
            StartServer(link); // the destination may fault while it restores the VM

            var type = link.MainReader.Read(out var payload);
            if (type == FrameType.Error) throw new MigrationAbort($"destination aborted before the switch-over: {ErrorMessage.Parse(payload).Text}");
            if (type != FrameType.Ready) throw new ProtocolException($"expected Ready, got {type}");
            // From here on the destination may run the VM: the source never resumes it.
            link.MainFrames.Send(FrameType.Commit, []);
            committed = true;
            _observer.Phase("post-copy");

            bool resumedSeen = false;
            while (true)
            {
                try
                {
                    if (!resumedSeen)
                    {
                        type = link.MainReader.Read(out payload);
                        if (type == FrameType.Error) throw new MigrationAbort($"destination failed at resume: {ErrorMessage.Parse(payload).Text}");
                        if (type != FrameType.Resumed) throw new ProtocolException($"expected Resumed, got {type}");
                        resumedSeen = true;
                        ResumedAt = Stopwatch.GetTimestamp();
                    }
                    PushAll(link, cancel);
                    // Every page is claimed; the server may still be sending its last answer.
                    lock (_serveLock) sourceHash = _hashes?.Combine() ?? 0;
                    var end = new PostCopyEndMessage(_options.Verify, sourceHash, Interlocked.Read(ref _pagesPushed), Interlocked.Read(ref _pagesRequested));
                    // Set before sending: the destination may answer and close the page-request
                    // connection at once, and the server must not take that for a failure.
                    Volatile.Write(ref _endSent, true);
                    link.MainFrames.Send(FrameType.PostCopyEnd, small[..end.Write(small)]);
                    type = link.MainReader.Read(out payload);
                    if (type == FrameType.Error) throw new MigrationAbort($"destination failed in post-copy: {ErrorMessage.Parse(payload).Text}");
                    if (type != FrameType.PostCopyDone) throw new ProtocolException($"expected PostCopyDone, got {type}");
                    done = PostCopyDoneMessage.Parse(payload);
                    break;
                }
                catch (Exception e) when (LinkFailure.Is(e) && !ServerSawProtocolError(link))
                {
                    // Recovery: both connections go; the paused memory stays here until the destination has every page.
                    _networkFaults++;
                    // Close both connections first: the server may be blocked reading a live
                    // page-request connection (e.g. the main one timed out), and would never end.
                    link.Break();
                    if (link.Server is { } st && st != Thread.CurrentThread) st.Join();
                    _observer.Phase($"recovering: {OneLine(link.ServerError is { } se && e is ObjectDisposedException ? se : e)}");
                    _bytesOfClosedLinks += link.BytesWritten;
                    Volatile.Write(ref _endSent, false);
                    link.Dispose();
                    link = Reconnect(connect, pendingAtSwitch, e, ref resumedSeen);
                }
            }
            CompletedAt = Stopwatch.GetTimestamp();
            if (!resumedSeen) ResumedAt = CompletedAt;
            _observer.Phase("done");
            _vm.Stop();
            bool verified = !_options.Verify || done.DestinationHash == sourceHash;
            long bytes = _bytesOfClosedLinks + link.BytesWritten;
            var report = BaseReport() with
            {
                StartedAt = started,
                Outcome = verified ? "completed" : "failed",
                Error = verified ? null : $"verification failed: destination pages hash {done.DestinationHash:x16} as placed, the source's paused memory {sourceHash:x16}",
                TotalTimeMs = Stopwatch.GetElapsedTime(t0, CompletedAt).TotalMilliseconds,
                DowntimeMs = Stopwatch.GetElapsedTime(PausedAt, ResumedAt).TotalMilliseconds,
                TimeToResumeMs = Stopwatch.GetElapsedTime(t0, ResumedAt).TotalMilliseconds,
                PostCopyMs = Stopwatch.GetElapsedTime(ResumedAt, CompletedAt).TotalMilliseconds,
                BytesOnWire = bytes,
                Bytes = WireBreakdown(bytes, stateBytes),
                PagesByEncoding = PagesByEncoding(),
                PagesSent = pagesInRounds + Interlocked.Read(ref _pagesPushed) + Interlocked.Read(ref _pagesRequested),
                PagesPushed = Interlocked.Read(ref _pagesPushed),
                PagesRequested = Interlocked.Read(ref _pagesRequested),
                PagesResent = Interlocked.Read(ref _requestsForSentPages),
                PagesPrepaged = _order.Prepaged,
                StopReason = HybridPolicy.Name(decision.Reason),
                Verified = _options.Verify ? verified : null,
                SourceHash = _options.Verify ? $"{sourceHash:x16}" : null,
                DestinationHash = _options.Verify ? $"{done.DestinationHash:x16}" : null,
                NetworkFaults = _networkFaults,
                Faults = done.Faults,
                FaultLatencyUs = new LatencySummary { P50 = done.P50Ns / 1000.0, P99 = done.P99Ns / 1000.0, Max = done.MaxNs / 1000.0 },
                RequestServiceUs = Summary(_serveLatency),
                Rounds = [.. _rounds],
            };
            link.Dispose();
            if (!verified) throw new MigrationFailedException(report.Error!, report);
            return report;
        }
        catch (Exception e) when (e is not MigrationFailedException)
        {
            // Anything at all: no thread of this migration may outlive it (they read guest memory).
            // A request server that met a protocol violation closed the link: its error is the cause.
            if (LinkFailure.Is(e) && _currentLink is { } cl && ServerSawProtocolError(cl)) e = cl.ServerError!;
            string why = e switch
            {
                OperationCanceledException => "migration cancelled",
                _ => e.Message,
            };
            if (!committed)
            {
                // The destination never got Commit: it discards its copy, the VM carries on here.
                if (link is not null)
                {
                    TrySendError(link.MainFrames, e is OperationCanceledException ? ErrorMessage.Cancelled : ErrorMessage.BadStream, why);
                    link.Dispose();
                }
                _vm.DirtyLog.Stop();
                if (paused) _vm.Resume();
            }
            else
            {
                link?.Dispose();
                _currentLink?.Dispose();
                why += " — after the switch to post-copy: the destination runs the VM with part of its memory; this source keeps the paused VM and every page it has not sent";
            }
            var report = BaseReport() with
            {
                StartedAt = started,
                Outcome = "failed",
                Error = why,
                TotalTimeMs = Stopwatch.GetElapsedTime(t0).TotalMilliseconds,
                BytesOnWire = _bytesOfClosedLinks + (link?.BytesWritten ?? 0),
                PagesByEncoding = PagesByEncoding(),
                PagesPushed = Interlocked.Read(ref _pagesPushed),
                PagesRequested = Interlocked.Read(ref _pagesRequested),
                NetworkFaults = _networkFaults,
                StopReason = HybridPolicy.Name(decision.Reason),
                Rounds = [.. _rounds],
            };
            throw new MigrationFailedException(why, report, e);
        }
    }

    private void Handshake(Link link, Span<byte> small)
    {
        var caps = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.PostCopy | (_options.Verify ? Capabilities.Verify : 0);
        var hello = new HelloMessage(ProtocolVersion.Version, ProtocolVersion.MinSupported, caps, caps,
            _vm.Memory.Size, GuestMemory.PageSize, VcpuCount, _id, _vm.Name, _vm.Kind);
        link.MainFrames.Send(FrameType.Hello, small[..hello.Write(small)]);
        var type = link.MainReader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.HelloAck) throw new ProtocolException($"expected HelloAck, got {type}");
        var ack = HelloAckMessage.Parse(payload);
        if (ack.Version < ProtocolVersion.MinSupported || ack.Version > ProtocolVersion.Version)
            throw new ProtocolException($"destination chose protocol version {ack.Version}, this source speaks {ProtocolVersion.MinSupported}..{ProtocolVersion.Version}");
        if ((caps & ~ack.Accepted) != 0)
            throw new MigrationAbort($"destination does not support {StrategyName} migration (missing capabilities: {caps & ~ack.Accepted})");
    }

    /// <summary>Opens the page-request connection of <paramref name="link"/>.</summary>
    private void OpenPriority(Link link, Func<ChannelKind, int, Stream> connect, int attempt)
    {
        var s = connect(ChannelKind.Priority, attempt);
        link.Priority = s;
        if (s.CanTimeout) { s.WriteTimeout = (int)_options.IoTimeout.TotalMilliseconds; s.ReadTimeout = (int)_options.IoTimeout.TotalMilliseconds; }
        link.PriorityFrames = new FrameWriter(s);
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
                long t0 = Stopwatch.GetTimestamp();
                int n = PageRequestMessage.Parse(payload, pageCount, pages);
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
                        writer.Add(p, skipZero: false, again: !first); // counted once by encoding, as the destination places it once
                    }
                    if (n > 0)
                    {
                        writer.Flush();
                        Limiter.Charge(frames.BytesWritten - b0); // counts against the cap, never waits for it
                        Interlocked.Add(ref _pagesRequested, sent);
                    }
                }
                _serveLatency.Record(Stopwatch.GetTimestamp() - t0);
            }
        }
        catch (Exception e) when (LinkFailure.Is(e) || e is InvalidOperationException or ProtocolException)
        {
            // Wakes the pusher (its writes fail) so that recovery starts. After PostCopyEnd the
            // destination closes this connection when it is done; if it still needed pages it
            // notices the failure itself and breaks the main connection.
            link.ServerError ??= e;
            if (!Volatile.Read(ref _endSent)) link.Break();
        }
    }

    /// <summary>Pushes every pending page on the main connection, in prepaging order, in small frames.</summary>
    private void PushAll(Link link, CancellationToken cancel)
    {
        var frames = link.MainFrames;
        var writer = new PageBatchWriter(frames, _vm.Memory) { Hashes = _hashes };
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

    /// <summary>Reconnects after a failure in post-copy, with bounded exponential back-off; learns what the destination has.</summary>
    private Link Reconnect(Func<ChannelKind, int, Stream> connect, PageBitmap pendingAtSwitch, Exception cause, ref bool resumedSeen)
    {
        var memory = _vm.Memory;
        var backoff = new RetryBackoff(_options.PostCopy.FirstRetryDelay, _options.PostCopy.MaxRetryDelay, _options.PostCopy.RecoveryTimeout);
        string last = OneLine(cause);
        Span<byte> buf = stackalloc byte[32];
        while (true)
        {
            int attempt = ++_attempt;
            Link? link = null;
            try
            {
                link = new Link(connect(ChannelKind.Main, attempt), Limiter, _options.IoTimeout);
                _currentLink = link;
                link.MainFrames.Send(FrameType.Attach, buf[..new AttachMessage(_id, ChannelKind.Main).Write(buf)]);
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
                return link;
            }
            catch (Exception e) when (LinkFailure.Is(e))
            {
                last = OneLine(e);
                if (link is not null) { _bytesOfClosedLinks += link.BytesWritten; link.Dispose(); }
                if (!ReconnectTarget.WaitToRetry(backoff, Target, default))
                    throw new RecoveryFailed($"post-copy recovery gave up after {_options.PostCopy.RecoveryTimeout.TotalSeconds:0.#} s and {attempt} attempts: {last}");
            }
        }
    }

    private static string OneLine(Exception e) => (e.InnerException?.Message ?? e.Message).ReplaceLineEndings(" ");

    private RoundStats SendRound(int round, PageBitmap pages, long count, FrameWriter frames, PageBatchWriter batches, bool skipZero, CancellationToken cancel)
    {
        Span<byte> small = stackalloc byte[16];
        long ts = Stopwatch.GetTimestamp();
        long bytes0 = frames.BytesWritten;
        long entries0 = batches.EntriesWritten;
        _observer.RoundStarted(round, count, false);
        frames.Send(FrameType.RoundStart, small[..new RoundStartMessage(round, false).Write(small)]);
        batches.BeginRound(round);
        RoundPages.Send(pages, batches, skipZero, null, _vm.DirtyLog, d => _observer.Progress(round, d, count, frames.BytesWritten), cancel);
        var duration = Stopwatch.GetElapsedTime(ts);
        long bytes = frames.BytesWritten - bytes0;
        long sent = batches.EntriesWritten - entries0;
        return new RoundStats(round, sent, bytes, duration, 0, bytes / Math.Max(duration.TotalSeconds, 1e-6), 0);
    }

    private void Record(RoundStats s)
    {
        var r = new RoundReport
        {
            Round = s.Round, Final = false, PagesSent = s.PagesSent, PagesDirtied = s.DirtyPagesAfter, BytesSent = s.BytesSent,
            DurationMs = s.Duration.TotalMilliseconds, BandwidthBytesPerSecond = s.BandwidthBytesPerSecond, DirtyRatePagesPerSecond = s.DirtyRatePagesPerSecond,
        };
        _rounds.Add(r);
        _observer.RoundCompleted(r);
    }

    private Dictionary<string, long> PagesByEncoding()
    {
        var d = new Dictionary<string, long>();
        lock (_counters)
            foreach (var c in _counters)
                foreach (var (k, v) in c.PagesByName()) d[k] = d.GetValueOrDefault(k) + v;
        return d;
    }

    private WireBytes WireBreakdown(long total, long stateBytes)
    {
        long pageData = 0, zeroPages = 0;
        lock (_counters)
            foreach (var c in _counters)
                for (int i = 0; i < EncodingCounters.Kinds; i++)
                {
                    var e = (PageEncoding)i;
                    if (e == PageEncoding.Zero) { zeroPages += c.Pages(e); continue; }
                    pageData += c.Bytes(e);
                }
        // Zero markers actually sent: zero pages minus those counted but never sent.
        long zeroMarkers = (zeroPages - _unsentZeros) * PageBatchWriter.EntryHeaderSize;
        return new WireBytes { PageData = pageData, ZeroMarkers = zeroMarkers, VmState = stateBytes, Protocol = total - pageData - zeroMarkers - stateBytes };
    }

    private static LatencySummary Summary(LatencyRecorder r)
    {
        var (p50, p99, max) = r.Summary();
        return new LatencySummary { P50 = p50, P99 = p99, Max = max };
    }

    private int VcpuCount => _vm.VcpuCount;

    private MigrationReport BaseReport() => new()
    {
        MigrationId = _id.ToString(),
        Role = "source",
        Strategy = StrategyName,
        VmName = _vm.Name,
        Workload = _vm.Description,
        MemoryBytes = _vm.Memory.Size,
        Vcpus = VcpuCount,
        DirtyLog = _options.Strategy == MigrationStrategy.Hybrid ? _vm.DirtyLog.Name : "none",
        BandwidthLimitBytesPerSecond = Limiter.BytesPerSecond,
        DowntimeLimitMs = _options.PreCopy.DowntimeLimit.TotalMilliseconds,
        Security = _options.Security.Mode,
    };

    private static void TrySendError(FrameWriter frames, ushort code, string text)
    {
        try
        {
            if (frames.IsOpen) frames.Abandon();
            Span<byte> buf = stackalloc byte[4100];
            frames.Send(FrameType.Error, buf[..new ErrorMessage(code, text).Write(buf)]);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException or InvalidOperationException) { }
    }

    private sealed class MigrationAbort(string message) : Exception(message);
    private sealed class RecoveryFailed(string message) : Exception(message);
}
