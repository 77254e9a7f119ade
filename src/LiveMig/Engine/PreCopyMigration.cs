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
/// The source side of a pre-copy migration (Clark et al., NSDI 2005): the <see cref="RoundController"/>
/// runs the live rounds — round 0 every populated page, each later one the pages dirtied
/// meanwhile — until the policy says stop; then this engine pauses the VM, sends the last dirty
/// pages and the VM state, and switches over in two steps (Prepare → Ready, Commit → Resumed).
/// Until Commit is sent any failure resumes the VM here; after a successful switch-over the
/// source VM is stopped for good. One instance migrates once.
/// </summary>
public sealed class PreCopyMigration
{
    private readonly IVirtualMachine _vm;
    private readonly MigrationOptions _options;
    private IMigrationObserver _observer;
    private readonly IPreCopyPolicy _policy;
    private readonly Guid _id = Guid.NewGuid();
    private readonly TimeProvider _time;
    private Func<int, Stream>? _dataConnector; // MigrateTo: data connection i, secured like the control connection

    // One run's state: the connection in use (replaced when the migration reattaches), what was measured.
    private Stream _stream = null!;
    private ConnectionRoundSender _sender = null!;
    private RoundController _controller = null!;
    private SourcePipeline? _pipeline;
    private StopAndCopy _switchover = null!;
    private bool _canResume, _setupDone;
    private int _reconnects, _attempts;
    private long _bytesOfClosedLinks, _t0;
    private DateTimeOffset _started;
    private readonly List<string> _interruptions = [];
    private readonly SwitchGate _gate = new();

    /// <summary>Cancels unless the switch-over has begun; the answer says which, decided atomically with the Commit.</summary>
    public CancelOutcome TryCancel() => _gate.TryCancel();

    public PreCopyMigration(IVirtualMachine vm, MigrationOptions options, IMigrationObserver? observer = null, IPreCopyPolicy? policy = null)
    {
        if (options.Streams < 1 || options.Streams > StreamLayout.MaxStreams)
            throw new ArgumentOutOfRangeException(nameof(options), $"Streams {options.Streams}: must be between 1 and {StreamLayout.MaxStreams}");
        BrakeCheck.Require(vm, options.PreCopy);
        _vm = vm;
        _options = options;
        _time = options.Time;
        _observer = observer ?? new NullObserver();
        _policy = policy ?? new PreCopyPolicy(options.PreCopy, options.Time);
        Limiter = new RateLimiter(options.BandwidthLimit, options.Time);
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

    /// <summary>
    /// On failure, leave a VM that this migration found paused, paused (a post-copy source
    /// starting over elsewhere: only the operator decides where the VM runs after a switch).
    /// </summary>
    internal bool KeepPausedOnFailure { get; init; }

    /// <summary>Connects to a destination agent and migrates.</summary>
    public MigrationReport MigrateTo(string host, int port, CancellationToken cancel = default)
    {
        var target = Target = new ReconnectTarget(host, port);
        Stream Open(int _)
        {
            var (h, p) = target.Current;
            return SourceConnection.Open(h, p, _options);
        }
        var connect = Connector ?? Open;
        Stream stream;
        try { stream = connect(0); }
        catch (Exception e) when (e is SocketException or AuthenticationFailedException or IOException)
        {
            string why = e is SocketException ? $"cannot connect to destination {host}:{port}: {LinkFailure.Describe(e)}" : e.Message;
            throw new MigrationFailedException(why, Report(why), e);
        }
        _dataConnector = Open;
        using (stream) return Run(stream, connect, cancel);
    }

    /// <summary>Migrates over an established stream (TCP, or a test's wrapper around one); no reconnecting.</summary>
    public MigrationReport Run(Stream stream, CancellationToken cancel = default) => Run(stream, Connector, cancel);

    private MigrationReport Run(Stream stream, Func<int, Stream>? reconnect, CancellationToken outside)
    {
        // Every cancellation, from the caller's token or TryCancel, goes through the gate.
        _gate.Follow(outside);
        var cancel = _gate.Token;
        _started = _time.GetUtcNow();
        _t0 = _time.GetTimestamp();
        _stream = stream;
        SetTimeouts(stream);
        var frames = new FrameWriter(stream, Limiter, _time);
        frames.SendOnOwnThread(); // the pages' copy and hash overlap the socket
        _sender = new ConnectionRoundSender(new PageBatchWriter(frames, _vm.Memory), _vm.DirtyLog, _observer, _time) { Bandwidth = Bandwidth };
        _sender.Bind(frames, new FrameReader(stream));
        _sender.StateBytes = _vm.StateSizeHint;
        _controller = new RoundController(_policy, _sender, _vm.DirtyLog, _vm, _time, _observer);
        _pipeline = _options.Pipeline.IsBaseline ? null : new SourcePipeline(_options.Pipeline, _vm.Memory.PageCount, new LinkEstimate(Limiter), Math.Max(1, _options.Streams), _time);
        _switchover = new StopAndCopy(_vm, _controller, _sender, _pipeline, _options.Verify, _time, _observer);
        try
        {
            Handshake(reconnect);
            // The switch-over's code compiles while round 0 is on the wire, not in the downtime.
            var warmup = SwitchoverWarmup.ForSource(_vm);
            SwitchoverWarmup.WarmBrakes(_vm);
            while (true)
            {
                try
                {
                    if (!_setupDone) Setup();
                    _observer.Phase("live");
                    _controller.RunLiveRounds(cancel);
                    EndOfRounds();
                    ((IAsyncResult)warmup).AsyncWaitHandle.WaitOne(TimeSpan.FromSeconds(1)); // done long ago, unless round 0 was tiny
                    _switchover.PauseAndPrepare();
                    break;
                }
                catch (Exception e) when (_canResume && _setupDone && !_switchover.Committed && LinkFailure.Is(e))
                {
                    Reattach(reconnect!, e, cancel);
                }
            }
            if (!_gate.TryCommit()) throw new OperationCanceledException(cancel);
            _switchover.Commit();
            return Report(null);
        }
        catch (Exception e) when (e is ProtocolException or IOException or MigrationAbort or OperationCanceledException or SocketException or ObjectDisposedException or VmFailedException)
        {
            string why = Fail(e);
            throw new MigrationFailedException(why, Report(why), e);
        }
        finally
        {
            _gate.End();
            // Every data connection closed and every stream thread joined: none outlives the migration.
            _sender.Streams?.Dispose();
            _sender.Streams = null;
            _sender.Frames.Dispose();
            _sender.Reader.Dispose();
            _pipeline?.Dispose();
            if (!ReferenceEquals(_stream, stream)) _stream.Dispose(); // a reattached connection is ours
        }
    }

    /// <summary>The bandwidth the VM state will see: the cap, else what the rounds measured.</summary>
    private double Bandwidth() => Limiter.BytesPerSecond > 0 ? Limiter.BytesPerSecond : _controller.Rounds.Count > 0 ? _controller.Rounds[0].BandwidthBytesPerSecond : 0;

    private void SetTimeouts(Stream stream)
    {
        // Any stream that can time out, not only a bare NetworkStream: a wrapper around a socket must not hang.
        if (!stream.CanTimeout) return;
        stream.ReadTimeout = (int)_options.IoTimeout.TotalMilliseconds;
        stream.WriteTimeout = (int)_options.IoTimeout.TotalMilliseconds;
    }

    private void Handshake(Func<int, Stream>? reconnect)
    {
        _observer.Phase("handshake");
        Span<byte> small = stackalloc byte[512 + HelloMessage.MaxSpecBytes];
        // Every stage asked for is required: a destination that lacks one refuses, naming it.
        var needed = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.RoundSync | (_options.Verify ? Capabilities.Verify : 0) | _options.Pipeline.Capabilities
            | (_options.Streams > 1 ? Capabilities.MultiStream : 0);
        // Resume after a drop is for the single connection: with several data streams a drop fails the migration (docs/protocol.md).
        var wanted = needed | Capabilities.Extents | (reconnect is not null && _options.ReconnectWindow > TimeSpan.Zero && _options.Streams == 1 ? Capabilities.PreCopyResume : 0)
            | Capabilities.PageHashCheck | (ChannelSecurity.IsSecured(_stream) ? Capabilities.TlsUnchecked : 0);
        var hello = new HelloMessage(ProtocolVersion.Version, ProtocolVersion.MinSupported, wanted, needed,
            _vm.Memory.Size, GuestMemory.PageSize, _vm.VcpuCount, _id, _vm.Name, _vm.Kind, _vm.Spec);
        _sender.Frames.SendNow(FrameType.Hello, small[..hello.Write(small)]);
        var type = _sender.Reader.Read(out var payload);
        if (type == FrameType.Error) throw new MigrationAbort($"destination {ErrorMessage.Parse(payload).Text}");
        if (type != FrameType.HelloAck) throw new ProtocolException($"expected HelloAck, got {type}");
        var ack = HelloAckMessage.Parse(payload);
        if (ack.Overreach(hello) is { } overreach) throw new ProtocolException(overreach);
        if ((hello.Required & ~ack.Accepted) != 0)
            throw new ProtocolException($"destination did not accept required capabilities: {hello.Required & ~ack.Accepted}");
        _canResume = (ack.Accepted & Capabilities.PreCopyResume) != 0;
        _announceExtents = (ack.Accepted & Capabilities.Extents) != 0;
        _sender.Batches.Check = _check = PageBatchChecks.Of(ack.Accepted);
    }

    private PageBatchCheck _check;

    private bool _announceExtents;

    /// <summary>
    /// Tracking starts before round 0 reads a page: every later write is caught. A drop after
    /// this (with resume negotiated) reattaches and goes on from the top of the live rounds.
    /// </summary>
    private void Setup()
    {
        if (!_vm.DirtyLog.IsTracking) _vm.DirtyLog.Start();
        // A log that compares content with what was sent (a QEMU guest's) needs the hashes of the pages as sent, verifying or not.
        if (_options.Verify || _vm.DirtyLog.NeedsSentHashes) _sender.Batches.Hashes = new PageHashes(_vm.Memory.PageCount);
        if (_sender.Batches.Hashes is { } sent) _vm.DirtyLog.CompareWithSent(sent);
        var first = FirstRound.Choose(_vm, _pipeline, _sender, _announceExtents);
        if (_options.Streams > 1)
        {
            var connectData = _options.StreamConnector ?? _dataConnector ?? throw new InvalidOperationException("several data streams need MigrateTo or MigrationOptions.StreamConnector");
            _sender.Streams = SourceStreams.Open(_options.Streams, _id, _sender.Frames, _sender.Reader, connectData, _vm.Memory, Limiter, _sender.Batches.Hashes, _pipeline, _options.IoTimeout, _check);
        }
        _controller.Begin(first);
        _setupDone = true;
    }

    /// <summary>
    /// The downtime limit is a promise: rounds that stalled short of it end as the user chose
    /// (<see cref="PreCopyOptions.OnStall"/>) — a failure that leaves the VM running here, or a
    /// longer pause within the maximum given.
    /// </summary>
    private void EndOfRounds()
    {
        var d = _controller.Decision;
        if (!d.Stalled && d.Ending == RoundsEnding.StopAndCopy) return;
        string stall = _controller.StallSummary(_options.PreCopy.DowntimeLimit);
        if (d.Ending == RoundsEnding.StopAndCopy)
        {
            _controller.Escalations.Add($"{stall}; paused anyway, within the maximum downtime of {_options.PreCopy.MaxDowntime?.TotalMilliseconds:0} ms");
            return;
        }
        string why = d.Ending == RoundsEnding.PostCopy
            ? $"{stall}; the policy asked to switch to post-copy, which PreCopyMigration cannot do (PostCopyMigration runs pre-copy that may switch; Migrations.MigrateTo picks it for OnStall = PostCopy)"
            : $"{stall}; migration aborted, the VM keeps running on the source. It would converge with --on-stall throttle (slow the guest), --on-stall postcopy, a higher --bandwidth or --compress; or accept the pause with --on-stall pause --max-downtime TIME";
        _controller.Escalations.Add(why);
        throw new MigrationAbort(why);
    }

    /// <summary>What a failure leaves: before Commit the VM runs on here, unslowed; after it, it stays paused. Returns the reason.</summary>
    private string Fail(Exception e)
    {
        string why = e switch
        {
            OperationCanceledException => "migration cancelled",
            IOException io when !_switchover.Committed => DestinationError(_sender.Reader, _stream) ?? $"connection to the destination failed: {LinkFailure.Describe(io)}",
            _ => e.Message,
        };
        if (_switchover.Committed)
            return why + " — after Commit: the destination may have resumed the VM, so the source keeps it paused (never running on both)";
        // The destination never got Commit: it discards its copy, the VM carries on here.
        TrySendError(_sender.Frames, e is OperationCanceledException ? ErrorMessage.Cancelled : ErrorMessage.BadStream, why);
        _vm.DirtyLog.Stop();
        try
        {
            _controller.ReleaseBrakes();
            if (!KeepPausedOnFailure) _switchover.ResumeAfterDrop();
        }
        catch (VmFailedException vmFailed) { return $"{why}; the VM could not be resumed either: {vmFailed.Message}"; } // e.g. its QEMU died
        return why;
    }

    /// <summary>
    /// The link dropped before the switch-over: the VM keeps running here while the source
    /// reattaches to the same destination, which kept its partial copy, and goes on with the
    /// pages that did not arrive.
    /// </summary>
    private void Reattach(Func<int, Stream> reconnect, Exception cause, CancellationToken cancel)
    {
        long cut = _time.GetTimestamp();
        string phase = _switchover.Paused ? "stop-and-copy" : $"round {_controller.Round}";
        _observer.Phase("reconnecting");
        if (!KeepPausedOnFailure) _switchover.ResumeAfterDrop();
        _bytesOfClosedLinks += _sender.Frames.BytesWritten;
        _sender.Frames.Dispose();
        _sender.Reader.Dispose();
        // Closed even when it is the caller's: the destination must see this connection end.
        try { _stream.Dispose(); } catch (Exception x) when (x is IOException or ObjectDisposedException or SocketException) { }
        var delivered = new PageBitmap(_vm.Memory.PageCount);
        var (stream, frames, reader) = Connect(reconnect, cause, _controller.InFlightRound, delivered, cancel);
        _stream = stream;
        _sender.Bind(frames, reader);
        // Pages that may not have arrived are pending again, and no delta or dedup reference may lean on them.
        if (_controller.Reattached(delivered) is { } lost) _pipeline?.Forget(lost);
        _sender.Batches.Rebind(frames);
        _reconnects++;
        long pending = _controller.NextRoundPages;
        _interruptions.Add($"{phase}: {OneLine(cause)}; reattached after {_time.GetElapsedTime(cut).TotalMilliseconds:0} ms (attempt {_attempts}); {pending} pages to send again or for the first time");
        _observer.Phase($"reattached (attempt {_attempts}): {pending} pages pending");
    }

    private static string OneLine(Exception e) => (e is IOException or SocketException ? LinkFailure.Describe(e) : e.InnerException?.Message ?? e.Message).ReplaceLineEndings(" ");

    /// <summary>
    /// Reconnects after a drop and reattaches to the destination's partial copy (Attach on the
    /// main channel → Attached), with bounded exponential back-off. A destination that no longer
    /// holds the migration (window over, already prepared, restarted) answers Error: no retry.
    /// </summary>
    private (Stream, FrameWriter, FrameReader) Connect(Func<int, Stream> connect, Exception cause, int inFlightRound, PageBitmap delivered, CancellationToken cancel)
    {
        var backoff = new RetryBackoff(_options.PostCopy.FirstRetryDelay, _options.PostCopy.MaxRetryDelay, _options.ReconnectWindow, _time);
        string last = OneLine(cause);
        while (true)
        {
            cancel.ThrowIfCancellationRequested();
            _attempts++;
            try
            {
                return TryAttach(connect, cause, inFlightRound, delivered);
            }
            catch (Exception e) when (LinkFailure.Is(e) || e is AuthenticationFailedException)
            {
                last = OneLine(e);
            }
            if (!ReconnectTarget.WaitToRetry(backoff, Target, cancel))
                throw new MigrationAbort($"connection lost ({OneLine(cause)}) and not re-established within {backoff.Window.TotalSeconds:0.#} s ({_attempts} attempts; last: {last})");
        }
    }

    /// <summary>One attempt: connect, Attach, read which pages of the round in flight arrived (Delivered…), Attached.</summary>
    private (Stream, FrameWriter, FrameReader) TryAttach(Func<int, Stream> connect, Exception cause, int inFlightRound, PageBitmap delivered)
    {
        Span<byte> buf = stackalloc byte[32];
        Stream? s = null;
        FrameWriter? w = null;
        FrameReader? r = null;
        bool ok = false;
        try
        {
            s = connect(_attempts);
            SetTimeouts(s);
            w = new FrameWriter(s, Limiter, _time);
            r = new FrameReader(s);
            w.SendNow(FrameType.Attach, buf[..new AttachMessage(_id, ChannelKind.Main).Write(buf)]);
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
        finally
        {
            if (!ok)
            {
                w?.Dispose();
                r?.Dispose();
                s?.Dispose();
            }
        }
    }

    /// <summary>The report, for success (<paramref name="error"/> null) and failure alike, from what this run measured.</summary>
    private MigrationReport Report(string? error)
    {
        var r = SourceReport.Common(_vm, _options, _id, "precopy", Limiter, _controller, _pipeline) with
        {
            StartedAt = _started,
            Outcome = error is null ? "completed" : "failed",
            Error = error,
        };
        if (_sender is null) return r; // failed before it began (no connection)
        long bytes = _bytesOfClosedLinks + _sender.BytesWritten;
        r = r with
        {
            TotalTimeMs = _time.GetElapsedTime(_t0, error is null ? _switchover.ResumedTimestamp : _time.GetTimestamp()).TotalMilliseconds,
            BytesOnWire = bytes,
            Bytes = SourceReport.Wire(bytes, _sender.Counters(), _controller.ZeroMarkers, _switchover.StateBytes),
            Reconnects = _reconnects,
            Interruptions = [.. _interruptions],
            PagesByEncoding = _sender.Counters().PagesByName(),
            Streams = Math.Max(1, _options.Streams),
            FrameCheck = PageBatchChecks.Name(_check),
        };
        return _switchover.AddTo(r, _options.PreCopy.DowntimeLimit);
    }

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

    internal static void TrySendError(FrameWriter frames, ushort code, string text)
    {
        try
        {
            if (frames.IsOpen) frames.Abandon();
            Span<byte> buf = stackalloc byte[4100];
            frames.SendNow(FrameType.Error, buf[..new ErrorMessage(code, text).Write(buf)]); // why it ends is not held back by the cap
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException or InvalidOperationException) { }
    }
}
