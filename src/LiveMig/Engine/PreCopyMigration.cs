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
/// The source side of a pre-copy migration (Clark et al., NSDI 2005): round 0 sends every
/// populated page, each later round the pages dirtied during the previous one, until the policy
/// says stop; then pause, send the last dirty pages and the VM state, and switch over in two
/// steps (Prepare → Ready, Commit → Resumed). Until Commit is sent any failure resumes the VM
/// here; after a successful switch-over the source VM is stopped for good.
/// </summary>
public sealed class PreCopyMigration
{
    private readonly IVirtualMachine _vm;
    private readonly MigrationOptions _options;
    private IMigrationObserver _observer;
    private readonly IPreCopyPolicy _policy;
    private readonly List<RoundReport> _rounds = [];
    private readonly Guid _id = Guid.NewGuid();
    private Func<int, Stream>? _dataConnector; // MigrateTo: data connection i, secured like the control connection
    private SourceStreams? _streams;           // several data streams (SourceStreams.cs), or null

    public PreCopyMigration(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer = null, IPreCopyPolicy? policy = null)
    {
        if (options.Streams < 1 || options.Streams > StreamLayout.MaxStreams)
            throw new ArgumentOutOfRangeException(nameof(options), $"Streams {options.Streams}: must be between 1 and {StreamLayout.MaxStreams}");
        _vm = vm;
        _options = options;
        _observer = observer ?? new NullObserver();
        _policy = policy ?? new PreCopyPolicy(options.PreCopy, options.Time);
        Limiter = new RateLimiter(options.BandwidthLimit);
    }

    /// <summary>Who is told about progress; set before <see cref="Run"/>.</summary>
    public IMigrationObserver Observer { get => _observer; set => _observer = value ?? new NullObserver(); }

    /// <summary>The migration's bandwidth cap; set <see cref="RateLimiter.BytesPerSecond"/> to change it while running.</summary>
    public RateLimiter Limiter { get; }

    private sealed class NullObserver : IMigrationObserver;

    public Guid MigrationId => _id;

    /// <summary>
    /// Makes each connection (attempt 0 is the first; later ones reattach after a drop when
    /// <see cref="MigrationOptions.ReconnectWindow"/> allows). Tests wrap streams here to inject
    /// faults. Default: TCP (and the configured security) to the <see cref="MigrateTo"/> address.
    /// </summary>
    public Func<int, Stream>? Connector { get; init; }

    /// <summary>Where reconnections go (set by <see cref="MigrateTo"/>); <see cref="ReconnectTarget.RetryNow"/> cuts a back-off short.</summary>
    public ReconnectTarget? Target { get; private set; }

    /// <summary>Connects to a destination agent and migrates.</summary>
    public MigrationReport MigrateTo(string host, int port, CancellationToken cancel = default)
    {
        var target = Target = new ReconnectTarget(host, port);
        var connect = Connector ?? (_ =>
        {
            var (h, p) = target.Current;
            return SourceConnection.Open(h, p, _options.Security, _options.IoTimeout);
        });
        Stream stream;
        try { stream = connect(0); }
        catch (Exception e) when (e is SocketException or AuthenticationFailedException or IOException)
        {
            string why = e is SocketException ? $"cannot connect to destination {host}:{port}: {e.Message}" : e.Message;
            throw new MigrationFailedException(why, BaseReport() with { Outcome = "failed", Error = why }, e);
        }
        _dataConnector = _ =>
        {
            var (h, p) = target.Current;
            return SourceConnection.Open(h, p, _options.Security, _options.IoTimeout);
        };
        using (stream) return Run(stream, connect, cancel);
    }

    /// <summary>Migrates over an established stream (TCP, or a test's wrapper around one); no reconnecting.</summary>
    public MigrationReport Run(Stream stream, CancellationToken cancel = default) => Run(stream, Connector, cancel);

    private MigrationReport Run(Stream stream, Func<int, Stream>? reconnect, CancellationToken cancel)
    {
        var stream0 = stream;
        // Any stream that can time out, not only a bare NetworkStream: a wrapper around a socket must not hang.
        if (stream.CanTimeout)
        {
            stream.ReadTimeout = (int)_options.IoTimeout.TotalMilliseconds;
            stream.WriteTimeout = (int)_options.IoTimeout.TotalMilliseconds;
        }
        var started = DateTimeOffset.UtcNow;
        long t0 = Stopwatch.GetTimestamp();
        // The connection in use: replaced when the migration reattaches after a drop.
        var frames = new FrameWriter(stream, Limiter);
        var reader = new FrameReader(stream);
        var batches = new PageBatchWriter(frames, _vm.Memory);
        bool canResume = false, setupDone = false;
        int reconnects = 0, attempts = 0;
        long bytesOfClosedLinks = 0;
        var interruptions = new List<string>();
        // Pages sent since the destination last acknowledged delivery: after a drop they may or may not be there.
        PageBitmap? inFlight = null;
        int inFlightRound = -1;
        var memory = _vm.Memory;
        using var pipeline = _options.Pipeline.IsBaseline ? null : new SourcePipeline(_options.Pipeline, memory.PageCount, new LinkEstimate(Limiter), Math.Max(1, _options.Streams), _options.Time);
        bool paused = false, committed = false, hashesDiffer = false;
        long pauseTs = 0, stateBytes = 0, zeroMarkers = 0, pagesSent = 0;
        long pagesSkipped = 0, deferredAtStop = 0;
        double verifyMs = 0, maxThrottle = 0, maxDirtyLimit = 0;
        var meter = new ThrottleMeter(_vm);
        var downtime = new PhaseClock();
        double pauseBarrierMs = 0;
        ulong sourceHash = 0;
        ReadyMessage ready = default;
        PreCopyDecision decision = default;
        Span<byte> small = stackalloc byte[512];

        try
        {
            _observer.Phase("handshake");
            // Every stage asked for is required: a destination that lacks one refuses, naming it.
            var needed = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.RoundSync | (_options.Verify ? Capabilities.Verify : 0) | _options.Pipeline.Capabilities
                | (_options.Streams > 1 ? Capabilities.MultiStream : 0);
            // Resume after a drop is for the single connection: with several data streams a drop fails the migration (docs/protocol.md).
            var wanted = needed | Capabilities.Extents | (reconnect is not null && _options.ReconnectWindow > TimeSpan.Zero && _options.Streams == 1 ? Capabilities.PreCopyResume : 0);
            var hello = new HelloMessage(ProtocolVersion.Version, ProtocolVersion.MinSupported, wanted, needed,
                memory.Size, GuestMemory.PageSize, VcpuCount, _id, _vm.Name, _vm.Kind);
            frames.Send(FrameType.Hello, small[..hello.Write(small)]);
            var type = reader.Read(out var payload);
            if (type == FrameType.Error) throw new MigrationAbort($"destination {ErrorMessage.Parse(payload).Text}");
            if (type != FrameType.HelloAck) throw new ProtocolException($"expected HelloAck, got {type}");
            var ack = HelloAckMessage.Parse(payload);
            if (ack.Version < ProtocolVersion.MinSupported || ack.Version > ProtocolVersion.Version)
                throw new ProtocolException($"destination chose protocol version {ack.Version}, this source speaks {ProtocolVersion.MinSupported}..{ProtocolVersion.Version}");
            if ((hello.Required & ~ack.Accepted) != 0)
                throw new ProtocolException($"destination did not accept required capabilities: {hello.Required & ~ack.Accepted}");
            canResume = (ack.Accepted & Capabilities.PreCopyResume) != 0;

            // The switch-over's code compiles while round 0 is on the wire, not in the downtime.
            var warmup = SwitchoverWarmup.ForSource(_vm);
            SwitchoverWarmup.WarmBrakes(_vm);
            // Tracking starts before round 0 reads a page: every later write is caught. A drop after
            // that (with resume negotiated) reattaches and goes on from the top of the live loop.
            PageBitmap pending = null!, sendNow = null!, dirtied = null!;
            long lastHarvest = 0, sendCount = 0, deferred = 0;
            bool skipRewritten = false;
            int round = 0;
            while (true)
            {
                try
                {
                    if (!setupDone)
                    {
                        if (!_vm.DirtyLog.IsTracking) _vm.DirtyLog.Start();
                        lastHarvest = Stopwatch.GetTimestamp();
                        if (_options.Verify) batches.Hashes = new PageHashes(memory.PageCount);
                        // pending: every page the destination does not have as it is now. sendNow: what the
                        // current live round sends (the policy may hold hot pages back). dirtied: one harvest.
                        pending = new PageBitmap(memory.PageCount);
                        sendNow = new PageBitmap(memory.PageCount);
                        dirtied = new PageBitmap(memory.PageCount);
                        var extents = memory.DataExtents();
                        long populated = 0;
                        foreach (var (first, count) in extents) { pending.SetRange(first, count); populated += count; }
                        sendNow.CopyFrom(pending);
                        sendCount = populated;
                        // Holes are zero pages the destination already has (its memory starts zero): counted, never sent.
                        batches.Counters.AddPages(PageEncoding.Zero, memory.PageCount - populated);
                        // Clark's trick, where the dirty log can be peeked at for free: a page written again since
                        // its harvest is pending again, so sending it now would be wasted.
                        skipRewritten = _policy.SkipRewrittenPages && _vm.DirtyLog.CanPeek;
                        if (pipeline is not null)
                        {
                            if (pipeline.Options.Capabilities != 0)
                            {
                                batches.Encoder = pipeline.CreateEncoder();
                                batches.Link = pipeline.Link;
                            }
                            // Free pages and pages the destination already holds leave round 0 (and the pending set).
                            if (pipeline.Options.SkipFreePages) SkipFreePages(pipeline, pending, populated, batches);
                            if (pipeline.Options.Dedup) GangDedup(pipeline, pending, frames, reader, batches);
                            sendNow.CopyFrom(pending);
                            sendCount = pending.Count();
                        }
                        if ((ack.Accepted & Capabilities.Extents) != 0)
                        {
                            // Lets the destination fault in ahead the pages round 0 will bring (first touch is slow).
                            var runs = pipeline is null ? extents : pending.Runs();
                            if (runs.Count <= ExtentsMessage.MaxExtents)
                            {
                                var buf = frames.Begin(FrameType.Extents, runs.Count * 8);
                                frames.Commit(ExtentsMessage.Write(buf, runs));
                            }
                        }
                        if (_options.Streams > 1)
                        {
                            var connectData = _options.StreamConnector ?? _dataConnector ?? throw new InvalidOperationException("several data streams need MigrateTo or MigrationOptions.StreamConnector");
                            _streams = SourceStreams.Open(_options.Streams, _id, frames, reader, connectData, memory, Limiter, batches.Hashes, pipeline, _options.IoTimeout);
                        }
                        setupDone = true;
                    }
                    _observer.Phase("live");
                    while (true)
                    {
                        cancel.ThrowIfCancellationRequested();
                        pending.AndNot(sendNow);
                        (inFlight, inFlightRound) = (sendNow, round);
                        var (stats, zeros, skipped) = SendRound(round, final: false, sendNow, sendCount, frames, batches, skipZero: round == 0, skipRewritten ? pending : null, cancel);
                        long syncFrom = Stopwatch.GetTimestamp();
                        zeroMarkers += zeros;
                        pagesSent += stats.PagesSent;
                        pagesSkipped += skipped;
                        // Wait until the destination has the round: the socket buffers (megabytes on a
                        // long link) drain while the VM still runs, not in the downtime, and the round's
                        // time and bandwidth are those of delivery.
                        frames.Send(FrameType.Sync, small[..new SyncMessage(round).Write(small)]);
                        type = reader.Read(out payload);
                        if (type == FrameType.Error) throw new MigrationAbort($"destination aborted: {ErrorMessage.Parse(payload).Text}");
                        if (type != FrameType.SyncAck || SyncMessage.Parse(payload, "SyncAck").Round != round) throw new ProtocolException($"expected SyncAck for round {round}, got {type}");
                        inFlight = null;
                        stats = stats with { Duration = stats.Duration + Stopwatch.GetElapsedTime(syncFrom) };
                        stats = stats with { BandwidthBytesPerSecond = stats.BytesSent / Math.Max(stats.Duration.TotalSeconds, 1e-6) };
                        dirtied.ClearAll();
                        long harvested = _vm.DirtyLog.Harvest(dirtied);
                        long harvestTs = Stopwatch.GetTimestamp();
                        double interval = Stopwatch.GetElapsedTime(lastHarvest, harvestTs).TotalSeconds;
                        lastHarvest = harvestTs;
                        pending.Or(dirtied);
                        long pendingCount = pending.Count();
                        sendCount = _policy.PlanNextRound(dirtied, pending, sendNow);
                        var roundStats = stats with
                        {
                            DirtyPagesAfter = pendingCount,
                            DirtyRatePagesPerSecond = harvested / Math.Max(interval, 1e-6),
                            PagesSkipped = skipped,
                            PagesDeferred = deferred,
                            PagesDirtied = harvested,
                            NextRoundPages = sendCount,
                        };
                        deferred = pendingCount - sendCount;
                        SendRoundEnd(frames, roundStats, small);
                        decision = _policy.AfterRound(roundStats);
                        Record(roundStats, final: false, decision.EstimatedDowntime);
                        // Mechanism only: the policy decided whether and how hard to slow the guest.
                        if (decision.Throttle is { } t) _vm.Throttle(t);
                        if (decision.DirtyLimit is { } l) _vm.LimitDirtyRate(l);
                        if (_vm.ThrottleFraction > 0 || _vm.DirtyRateLimit > 0) meter.SlowedDown();
                        maxThrottle = Math.Max(maxThrottle, _vm.ThrottleFraction);
                        maxDirtyLimit = Math.Max(maxDirtyLimit, _vm.DirtyRateLimit);
                        if (decision.StopAndCopy) break;
                        round++;
                    }
                    deferredAtStop = deferred;
                    ((IAsyncResult)warmup).AsyncWaitHandle.WaitOne(TimeSpan.FromSeconds(1)); // done long ago, unless round 0 was tiny

                    // Stop and copy.
                    _observer.Phase("paused");
                    long pauseAsked = Stopwatch.GetTimestamp();
                    _vm.Pause();
                    pauseTs = Stopwatch.GetTimestamp();
                    paused = true;
                    pauseBarrierMs = Stopwatch.GetElapsedTime(pauseAsked, pauseTs).TotalMilliseconds;
                    downtime.Start(pauseTs);
                    // Paused, a throttle or limit has nothing left to do: release it now, so the guest
                    // never runs slowed again here (a failed switch-over resumes it) and its saved state is clean.
                    meter.Ended();
                    ReleaseGuest();
                    if (pipeline is not null) pipeline.Paused = true;
                    downtime.Mark("release-brakes");
                    _vm.DirtyLog.Harvest(pending);
                    long finalCount = pending.Count();
                    downtime.Mark("final-harvest");
                    round++;
                    (inFlight, inFlightRound) = (pending, round); // the final set stays pending until Ready
                    var (finalStats, finalZeros, _) = SendRound(round, final: true, pending, finalCount, frames, batches, skipZero: false, null, CancellationToken.None);
                    zeroMarkers += finalZeros;
                    pagesSent += finalStats.PagesSent;
                    SendRoundEnd(frames, finalStats, small);
                    downtime.Mark("final-round");
                    Record(finalStats, final: true, TimeSpan.Zero);
                    downtime.Mark("observer");

                    byte[] state = _vm.SaveState();
                    downtime.Mark("save-state");
                    stateBytes = VmStateChunks.Send(frames, state);
                    downtime.Mark("send-vm-state");
                    if (batches.Hashes is not null)
                    {
                        // Every page's hash was taken as it was sent, and the final round re-sent every
                        // page written since: the per-page hashes now describe the paused memory exactly.
                        long h0 = Stopwatch.GetTimestamp();
                        sourceHash = batches.Hashes.Combine();
                        verifyMs = Stopwatch.GetElapsedTime(h0).TotalMilliseconds;
                    }
                    downtime.Mark("hash-combine");
                    var prepare = new PrepareMessage(_options.Verify, sourceHash, pagesSent, ReasonName(decision.Reason), batches.Counters.Skipped);
                    frames.Send(FrameType.Prepare, small[..prepare.Write(small)]);
                    type = reader.Read(out payload);
                    if (type == FrameType.Error)
                    {
                        var refusal = ErrorMessage.Parse(payload);
                        hashesDiffer = refusal.Code == ErrorMessage.VerificationFailed;
                        throw new MigrationAbort($"destination aborted before the switch-over: {refusal.Text}");
                    }
                    if (type != FrameType.Ready) throw new ProtocolException($"expected Ready, got {type}");
                    ready = ReadyMessage.Parse(payload);
                    downtime.Mark("prepare-to-ready");
                    if (_options.Verify && ready.DestinationHash != sourceHash)
                    {
                        hashesDiffer = true;
                        throw new MigrationAbort($"destination memory hash {ready.DestinationHash:x16} differs from the source's {sourceHash:x16}");
                    }
                    break;
                }
                catch (Exception e) when (canResume && setupDone && !committed && LinkFailure.Is(e))
                {
                // The link dropped before the switch-over: the VM keeps running here while the
                // source reattaches to the same destination, which kept its partial copy.
                long cut = Stopwatch.GetTimestamp();
                string phase = paused ? "stop-and-copy" : $"round {round}";
                _observer.Phase("reconnecting");
                if (paused)
                {
                    _vm.Resume();
                    paused = false;
                }
                bytesOfClosedLinks += frames.BytesWritten;
                frames.Dispose();
                reader.Dispose();
                // Closed even when it is the caller's: the destination must see this connection end.
                try { stream.Dispose(); } catch (Exception x) when (x is IOException or ObjectDisposedException or SocketException) { }
                var delivered = new PageBitmap(memory.PageCount);
                (stream, frames, reader) = Reattach(reconnect!, e, ref attempts, inFlightRound, delivered, cancel);
                if (inFlight is not null)
                {
                    // Pages sent since the last acknowledgement that did not arrive are pending
                    // again, and no delta or dedup reference may lean on them. Those that arrived
                    // are there as last sent (one connection keeps a page's versions in order).
                    inFlight.AndNot(delivered);
                    if (!ReferenceEquals(inFlight, pending)) pending.Or(inFlight);
                    pipeline?.Forget(inFlight);
                    inFlight = null;
                }
                batches.Rebind(frames);
                reconnects++;
                sendNow.CopyFrom(pending);
                sendCount = pending.Count();
                deferred = 0;
                round++;
                interruptions.Add($"{phase}: {OneLine(e)}; reattached after {Stopwatch.GetElapsedTime(cut).TotalMilliseconds:0} ms (attempt {attempts}); {sendCount} pages to send again or for the first time");
                _observer.Phase($"reattached (attempt {attempts}): {sendCount} pages pending");
                }
            }

            // Step 2: from here on the destination may run the VM, so the source never resumes it.
            frames.Send(FrameType.Commit, []);
            committed = true;
            type = reader.Read(out payload);
            if (type != FrameType.Resumed) throw new ProtocolException($"expected Resumed, got {type}");
            long resumedTs = Stopwatch.GetTimestamp();
            downtime.Mark("commit-to-resumed");
            _observer.Phase("resumed");
            _vm.DirtyLog.Stop();
            _vm.Stop();

            return BaseReport() with
            {
                StartedAt = started,
                TotalTimeMs = Stopwatch.GetElapsedTime(t0, resumedTs).TotalMilliseconds,
                DowntimeMs = Stopwatch.GetElapsedTime(pauseTs, resumedTs).TotalMilliseconds,
                VerifyMs = verifyMs + ready.VerifyUs / 1000.0,
                DowntimeBreakdown = new DowntimeBreakdown { PauseBarrierMs = pauseBarrierMs, Source = downtime.Phases, SourceJitMs = downtime.JitMs },
                BytesOnWire = bytesOfClosedLinks + frames.BytesWritten + (_streams?.BytesWritten ?? 0),
                Bytes = WireBreakdown(bytesOfClosedLinks + frames.BytesWritten + (_streams?.BytesWritten ?? 0), Counters(batches, _streams), zeroMarkers, stateBytes),
                Reconnects = reconnects,
                Interruptions = interruptions,
                PagesByEncoding = Counters(batches, _streams).PagesByName(),
                Streams = _streams?.Count ?? 1,
                Stages = pipeline?.Report() ?? [],
                PagesSent = pagesSent,
                StopReason = ReasonName(decision.Reason),
                EstimatedDowntimeMs = Ms(decision.EstimatedDowntime),
                Verified = _options.Verify ? true : null,
                SourceHash = _options.Verify ? $"{sourceHash:x16}" : null,
                DestinationHash = _options.Verify ? $"{ready.DestinationHash:x16}" : null,
                Throttle = maxThrottle,
                DirtyLimit = maxDirtyLimit,
                PagesSkipped = pagesSkipped,
                PagesDeferred = deferredAtStop,
                ThrottledMs = meter.ThrottledMs,
                OpsPerSecondBeforeThrottle = meter.RateBefore,
                OpsPerSecondThrottled = meter.RateDuring,
                OperationsLost = meter.OperationsLost,
                Rounds = [.. _rounds],
            };
        }
        catch (Exception e) when (e is ProtocolException or IOException or MigrationAbort or OperationCanceledException or SocketException or ObjectDisposedException)
        {
            string why = e switch
            {
                OperationCanceledException => "migration cancelled",
                IOException io when !committed => DestinationError(reader, stream) ?? $"connection to the destination failed: {io.InnerException?.Message ?? io.Message}",
                _ => e.Message,
            };
            if (!committed)
            {
                // The destination never got Commit: it discards its copy, the VM carries on here.
                TrySendError(frames, e is OperationCanceledException ? ErrorMessage.Cancelled : ErrorMessage.BadStream, why);
                _vm.DirtyLog.Stop();
                meter.Ended();
                ReleaseGuest();
                if (paused) _vm.Resume();
            }
            else
            {
                why += " — after Commit: the destination may have resumed the VM, so the source keeps it paused (never running on both)";
            }
            var report = BaseReport() with
            {
                StartedAt = started,
                Outcome = "failed",
                Error = why,
                TotalTimeMs = Stopwatch.GetElapsedTime(t0).TotalMilliseconds,
                BytesOnWire = bytesOfClosedLinks + frames.BytesWritten + (_streams?.BytesWritten ?? 0),
                Reconnects = reconnects,
                Interruptions = interruptions,
                PagesByEncoding = Counters(batches, _streams).PagesByName(),
                Streams = Math.Max(1, _options.Streams),
                Stages = pipeline?.Report() ?? [],
                PagesSent = pagesSent,
                Verified = hashesDiffer ? false : null,
                Throttle = maxThrottle,
                DirtyLimit = maxDirtyLimit,
                PagesSkipped = pagesSkipped,
                ThrottledMs = meter.ThrottledMs,
                OpsPerSecondBeforeThrottle = meter.RateBefore,
                OpsPerSecondThrottled = meter.RateDuring,
                OperationsLost = meter.OperationsLost,
                Rounds = [.. _rounds],
            };
            throw new MigrationFailedException(why, report, e);
        }
        finally
        {
            // Every data connection closed and every stream thread joined: none outlives the migration.
            _streams?.Dispose();
            _streams = null;
            frames.Dispose();
            reader.Dispose();
            if (!ReferenceEquals(stream, stream0)) stream.Dispose(); // a reattached connection is ours
        }
    }

    private static string OneLine(Exception e) => (e.InnerException?.Message ?? e.Message).ReplaceLineEndings(" ");

    /// <summary>
    /// Reconnects after a drop and reattaches to the destination's partial copy (Attach on the
    /// main channel → Attached), with bounded exponential back-off. A destination that no longer
    /// holds the migration (window over, already prepared, restarted) answers Error: no retry.
    /// </summary>
    private (Stream, FrameWriter, FrameReader) Reattach(Func<int, Stream> connect, Exception cause, ref int attempts, int inFlightRound, PageBitmap delivered, CancellationToken cancel)
    {
        var backoff = new RetryBackoff(_options.PostCopy.FirstRetryDelay, _options.PostCopy.MaxRetryDelay, _options.ReconnectWindow, _options.Time);
        string last = OneLine(cause);
        Span<byte> buf = stackalloc byte[32];
        while (true)
        {
            cancel.ThrowIfCancellationRequested();
            attempts++;
            Stream? s = null;
            FrameWriter? w = null;
            FrameReader? r = null;
            bool ok = false;
            try
            {
                s = connect(attempts);
                if (s.CanTimeout)
                {
                    s.ReadTimeout = (int)_options.IoTimeout.TotalMilliseconds;
                    s.WriteTimeout = (int)_options.IoTimeout.TotalMilliseconds;
                }
                w = new FrameWriter(s, Limiter);
                r = new FrameReader(s);
                w.Send(FrameType.Attach, buf[..new AttachMessage(_id, ChannelKind.Main).Write(buf)]);
                var type = r.Read(out var payload);
                var chunk = new PageBitmap(delivered.PageCount);
                delivered.ClearAll();
                for (; type == FrameType.Delivered; type = r.Read(out payload))
                {
                    // Only a report on the round in flight counts: an older round was acknowledged already.
                    if (DeliveredMessage.Apply(payload, chunk) == inFlightRound) delivered.Or(chunk);
                    chunk.ClearAll();
                }
                if (type == FrameType.Error) throw new MigrationAbort($"connection lost ({OneLine(cause)}) and the destination cannot resume: {ErrorMessage.Parse(payload).Text}");
                if (type != FrameType.Attached) throw new ProtocolException($"expected Attached after Attach, got {type}");
                AttachedMessage.Parse(payload);
                ok = true;
                return (s, w, r);
            }
            catch (Exception e) when (LinkFailure.Is(e) || e is AuthenticationFailedException)
            {
                last = OneLine(e);
            }
            finally
            {
                if (!ok)
                {
                    w?.Dispose();
                    r?.Dispose();
                    s?.Dispose();
                }
            }
            if (!ReconnectTarget.WaitToRetry(backoff, Target, cancel))
                throw new MigrationAbort($"connection lost ({OneLine(cause)}) and not re-established within {backoff.Window.TotalSeconds:0.#} s ({attempts} attempts; last: {last})");
        }
    }

    private int VcpuCount => _vm.VcpuCount;

    /// <summary>Releases any throttle or dirty limit this migration may have put on the guest.</summary>
    private void ReleaseGuest()
    {
        _vm.Throttle(0);
        _vm.LimitDirtyRate(0);
    }

    /// <summary>
    /// Sends the pages set in <paramref name="pages"/>. With <paramref name="skipRewrittenInto"/>,
    /// a page the dirty log says was written again since its harvest is not sent but put back
    /// there (it is pending again anyway).
    /// </summary>
    private (RoundStats Stats, long ZeroMarkers, long Skipped) SendRound(int round, bool final, PageBitmap pages, long count, FrameWriter frames, PageBatchWriter batches, bool skipZero, PageBitmap? skipRewrittenInto, CancellationToken cancel)
    {
        Span<byte> small = stackalloc byte[16];
        long ts = Stopwatch.GetTimestamp();
        long bytes0 = frames.BytesWritten + (_streams?.BytesWritten ?? 0);
        long zero0 = batches.Counters.Pages(PageEncoding.Zero), entries0 = _streams?.EntriesWritten ?? batches.EntriesWritten;
        var log = _vm.DirtyLog;
        _observer.RoundStarted(round, count, final);
        frames.Send(FrameType.RoundStart, small[..new RoundStartMessage(round, final).Write(small)]);
        batches.BeginRound(round);
        long done, skipped;
        if (_streams is { } ds)
        {
            long zeroBefore = ZeroPages(ds, batches);
            (done, skipped) = ds.SendRound(round, pages, skipZero, skipRewrittenInto, log, d => _observer.Progress(round, d, count, frames.BytesWritten + ds.BytesWritten), cancel);
            _observer.Progress(round, done, count, frames.BytesWritten + ds.BytesWritten);
            var took = Stopwatch.GetElapsedTime(ts);
            long streamBytes = frames.BytesWritten + ds.BytesWritten - bytes0;
            long zeroSent = skipZero ? 0 : ZeroPages(ds, batches) - zeroBefore;
            return (new RoundStats(round, ds.EntriesWritten - entries0, streamBytes, took, 0, streamBytes / Math.Max(took.TotalSeconds, 1e-6), 0), zeroSent, skipped);
        }
        (done, skipped) = RoundPages.Send(pages, batches, skipZero, skipRewrittenInto, log, d => _observer.Progress(round, d, count, frames.BytesWritten), cancel);
        var duration = Stopwatch.GetElapsedTime(ts);
        long bytes = frames.BytesWritten - bytes0;
        long sent = batches.EntriesWritten - entries0;
        long zeroMarkers = skipZero ? 0 : batches.Counters.Pages(PageEncoding.Zero) - zero0;
        return (new RoundStats(round, sent, bytes, duration, 0, bytes / Math.Max(duration.TotalSeconds, 1e-6), 0), zeroMarkers, skipped);
    }

    private static long ZeroPages(SourceStreams ds, PageBatchWriter batches) => Counters(batches, ds).Pages(PageEncoding.Zero);

    /// <summary>The page counters of the whole migration: the control connection's and, with several streams, theirs added.</summary>
    private static EncodingCounters Counters(PageBatchWriter batches, SourceStreams? ds)
    {
        if (ds is null) return batches.Counters;
        var sum = new EncodingCounters();
        sum.Merge(batches.Counters);
        ds.AddCountersTo(sum);
        return sum;
    }

    private static void SendRoundEnd(FrameWriter frames, RoundStats s, Span<byte> scratch)
    {
        var m = new RoundEndMessage(s.Round, s.PagesSent, s.DirtyPagesAfter, s.BytesSent, (long)s.Duration.TotalMicroseconds);
        frames.Send(FrameType.RoundEnd, scratch[..m.Write(scratch)]);
    }

    private void Record(RoundStats s, bool final, TimeSpan estimatedDowntime)
    {
        var r = new RoundReport
        {
            Round = s.Round, Final = final, PagesSent = s.PagesSent, PagesDirtied = s.DirtyPagesAfter, BytesSent = s.BytesSent,
            DurationMs = s.Duration.TotalMilliseconds, BandwidthBytesPerSecond = s.BandwidthBytesPerSecond, DirtyRatePagesPerSecond = s.DirtyRatePagesPerSecond,
            PagesSkipped = s.PagesSkipped, PagesDeferred = s.PagesDeferred, Throttle = _vm.ThrottleFraction, DirtyLimit = _vm.DirtyRateLimit,
            EstimatedDowntimeMs = final ? 0 : Ms(estimatedDowntime),
        };
        _rounds.Add(r);
        _observer.RoundCompleted(r);
    }

    private static WireBytes WireBreakdown(long total, EncodingCounters counters, long zeroMarkers, long stateBytes)
    {
        long pageData = counters.TotalBytes();
        long zero = zeroMarkers * PageBatchWriter.EntryHeaderSize;
        return new WireBytes { PageData = pageData, ZeroMarkers = zero, VmState = stateBytes, Protocol = total - pageData - zero - stateBytes };
    }

    /// <summary>
    /// Free-page hinting (round 0 only, as QEMU does): pages the guest reports free are not sent
    /// and stay zero at the destination. Asked after dirty tracking started, so a page written
    /// after the hint (or while it was taken) is dirty and sent in a later round. Their
    /// verification hash stays the zero page's: that is what the destination holds.
    /// </summary>
    private long SkipFreePages(SourcePipeline pipeline, PageBitmap toSend, long populated, PageBatchWriter batches)
    {
        long t0 = Stopwatch.GetTimestamp();
        var free = new PageBitmap(toSend.PageCount);
        _vm.ReportFreePages(free);
        long skipped = toSend.AndNot(free);
        batches.Counters.AddSkipped(skipped);
        pipeline.FreePages.Offered += populated;
        pipeline.FreePages.Encoded += skipped;
        pipeline.FreePages.Ticks += Stopwatch.GetTimestamp() - t0;
        return skipped;
    }

    /// <summary>
    /// Gang dedup before round 0: tells the destination the content hashes of the pages about to
    /// be sent; it fills those it already holds (from any VM it received, verified by hash) and
    /// says which. Those pages are not sent in round 0; a write after the hash was taken dirties
    /// the page, so it is sent in a later round like any other.
    /// </summary>
    private long GangDedup(SourcePipeline pipeline, PageBitmap toSend, FrameWriter frames, FrameReader reader, PageBatchWriter batches)
    {
        var candidates = pipeline.GangCandidates(_vm.Memory, toSend);
        if (candidates.Count == 0) return 0;
        var buffer = new byte[4 + DedupQuery.MaxEntries * DedupQuery.EntrySize];
        long filled = 0;
        for (int first = 0; first < candidates.Count; first += DedupQuery.MaxEntries)
        {
            int n = Math.Min(DedupQuery.MaxEntries, candidates.Count - first);
            var chunk = System.Runtime.InteropServices.CollectionsMarshal.AsSpan(candidates).Slice(first, n);
            frames.Send(FrameType.DedupQuery, buffer.AsSpan(0, DedupQuery.Write(buffer, chunk)));
            var type = reader.Read(out var payload);
            if (type == FrameType.Error) throw new MigrationAbort($"destination {ErrorMessage.Parse(payload).Text}");
            if (type != FrameType.DedupAnswer) throw new ProtocolException($"expected DedupAnswer, got {type}");
            bool[] answer = DedupAnswer.Parse(payload, n);
            for (int i = 0; i < n; i++)
            {
                if (!answer[i]) continue;
                var (page, hash) = chunk[i];
                toSend.Clear(page);
                batches.Hashes?.Set(page, _vm.Memory.Page(page));
                pipeline.GangFilled(page, hash);
                filled++;
            }
        }
        batches.Counters.AddPages(PageEncoding.Dedup, filled);
        return filled;
    }

    private MigrationReport BaseReport() => new()
    {
        MigrationId = _id.ToString(),
        Role = "source",
        Strategy = "precopy",
        StartedAt = DateTimeOffset.UtcNow,
        VmName = _vm.Name,
        Workload = _vm.Description,
        MemoryBytes = _vm.Memory.Size,
        Vcpus = VcpuCount,
        DirtyLog = _vm.DirtyLog.Name,
        BandwidthLimitBytesPerSecond = Limiter.BytesPerSecond,
        DowntimeLimitMs = _options.PreCopy.DowntimeLimit.TotalMilliseconds,
        Security = _options.Security.Mode,
        ConvergenceAids = ConvergenceAids(),
        Pipeline = _options.Pipeline.ToString(),
    };

    /// <summary>The convergence aids in force, for the report (skip-rewritten only where the dirty log allows it).</summary>
    private List<string> ConvergenceAids()
    {
        var o = _options.PreCopy;
        var aids = new List<string>();
        if (o.DeferHotPages) aids.Add("defer-hot-pages");
        if (_policy.SkipRewrittenPages && _vm.DirtyLog.CanPeek) aids.Add("skip-rewritten");
        if (o.PredictiveStop) aids.Add("predictive-stop");
        if (o.AutoConverge is not null) aids.Add("auto-converge");
        if (o.DirtyLimit > 0) aids.Add("dirty-limit");
        return aids;
    }

    internal static string ReasonName(StopReason r) => r switch
    {
        StopReason.DowntimeTarget => "downtime-target",
        StopReason.MaxRounds => "max-rounds",
        StopReason.NonConvergence => "non-convergence",
        StopReason.TimeBudget => "time-budget",
        StopReason.NoGain => "no-gain",
        _ => "",
    };

    private static double Ms(TimeSpan t) => t == TimeSpan.MaxValue ? -1 : t.TotalMilliseconds;

    /// <summary>After a failed write, the destination may have said why before closing: read it briefly.</summary>
    private static string? DestinationError(FrameReader reader, Stream stream)
    {
        try
        {
            if (stream.CanTimeout) stream.ReadTimeout = 1000;
            if (reader.Read(out var payload) == FrameType.Error) return "destination aborted: " + ErrorMessage.Parse(payload).Text;
        }
        catch (Exception e) when (e is IOException or ProtocolException or ObjectDisposedException or InvalidOperationException) { }
        return null;
    }

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

    /// <summary>A deliberate stop with a reason (refusal, verification failure).</summary>
    private sealed class MigrationAbort(string message) : Exception(message);
}
