using System.Net.Sockets;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>A VM that arrived and runs here, with the destination's report of its migration.</summary>
public sealed record ArrivedVm(IVirtualMachine Vm, MigrationReport Report)
{
    /// <summary>
    /// The VM's share of the destination's memory budget, when no <see cref="VmRegistry"/> holds
    /// it (the registry gives it back when the VM leaves): whoever keeps the VM disposes it then.
    /// </summary>
    public MemoryBudget.Reservation? Budget { get; init; }
}

/// <summary>
/// The destination side of one migration: a state machine over the frames (docs/protocol.md).
/// It checks every frame against the state it is in, places pages as they come, and resumes
/// the VM only on Commit. Any failure before that discards the partial VM and tells the source.
/// </summary>
public sealed class IncomingMigration
{
    private enum State { AwaitHello, Live, StopAndCopy, ReceivingState, HaveState, Prepared }

    private readonly DestinationOptions _options;
    private readonly DestinationSessions _sessions;
    private readonly VmRegistry? _vms;
    /// <summary>The arriving VM's name, reserved at Hello, and the migration's live figures (with a registry only).</summary>
    private MigrationProgress? _arrival;

    /// <summary>
    /// One incoming connection of a destination with <paramref name="options"/>. Migrations that
    /// later connections may join (resume, post-copy, data streams) are registered in
    /// <paramref name="sessions"/>: give every connection of one destination the same (a
    /// <see cref="MigrationListener"/> does); default: a registry of this connection's own.
    /// With <paramref name="vms"/> the VM's name is reserved there at Hello (a name taken is
    /// refused), the migration's live figures are listed there while it runs, and the VM that
    /// arrives is added to it.
    /// </summary>
    public IncomingMigration(DestinationOptions options, DestinationSessions? sessions = null, VmRegistry? vms = null)
    {
        _options = options;
        _sessions = sessions ?? new DestinationSessions();
        _vms = vms;
    }

    /// <summary>The VM's share of the destination's memory budget, reserved at Hello; given back unless the VM arrives.</summary>
    private MemoryBudget.Reservation? _budget;

    /// <summary>
    /// Receives one migration; null when the connection was a second channel of another migration
    /// (post-copy) and has ended. The VM's share of the memory budget goes with the VM that
    /// arrives: to the registry, which gives it back when the VM leaves; without one, in
    /// <see cref="ArrivedVm.Budget"/> for the caller to dispose. A failed migration gives it back here.
    /// </summary>
    public ArrivedVm? Receive(Stream stream)
    {
        try
        {
            var arrived = ReceiveMigration(stream);
            if (arrived is null) return null;
            var budget = _budget;
            _budget = null;
            if (_arrival is null) return arrived with { Budget = budget };
            _vms!.Arrived(_arrival, arrived.Vm, budget);
            return arrived;
        }
        finally
        {
            if (_arrival is not null) _vms!.EndArrival(_arrival);
            _budget?.Dispose(); // the migration failed: its VM is gone
        }
    }

    private ArrivedVm? ReceiveMigration(Stream stream)
    {
        if (stream.CanTimeout)
        {
            stream.ReadTimeout = (int)_options.IoTimeout.TotalMilliseconds;
            stream.WriteTimeout = (int)_options.IoTimeout.TotalMilliseconds;
        }
        var report = new DestinationReport(_options);
        // A resumed migration reads and writes through the connection the source came back on;
        // these two belong to the first one.
        using var reader0 = new FrameReader(stream);
        using var frames0 = new FrameWriter(stream);
        var reader = reader0;
        var frames = frames0;
        PreCopyResumption? resumption = null;
        long bytesOfEarlierLinks = 0;
        bool afterReattach = false;
        Span<byte> small = stackalloc byte[64];
        var state = State.AwaitHello;
        GuestMemory? memory = null;
        IVirtualMachine? vm = null;
        IVmFactory factory = null!; // the Hello's kind's, once the Hello is accepted
        IncomingVm incoming = null!;
        PageBatchReader? placer = null;
        PipelineDecoder? decoder = null;
        Capabilities accepted = 0;
        byte[]? vmState = null;
        var stateChunks = new VmStateAssembler(_options.MaxVmStateBytes);
        Prefaulter? prefaulter = null;
        bool extentsSeen = false, preparedMemory = false;
        HelloMessage hello = default;
        int currentRound = -1;
        long placedBeforeRound = 0; // pages placed before the round in progress began (live figures)
        PostCopyIncoming? postCopy = null;
        var downtime = new PhaseClock(_options.Time);
        string? restoreError = null;
        ParkedThreads? vcpuThreads = null;
        IncomingStreams? streams = null; // several data streams (IncomingStreams.cs)
        PlacingThread? placing = null; // places this connection's pages while it reads on (DestinationOptions.PlacingThread)
        bool provisioned = false; // the state made at the first frame after the Hello
        bool created = false; // the factory made this migration's memory (and whatever goes with it)

        try
        {
            while (true)
            {
              try
              {
                FrameType type;
                ReadOnlySpan<byte> payload;
                try { type = reader.Read(out payload); }
                catch (Exception) when (placing is not null) { placing.Drain(); throw; } // a bad page placed earlier is the cause, not what followed it
                long frame = reader.FramesRead - 1;
                if (type != FrameType.PageBatch) placing?.Drain(); // every page before this frame is placed before it is acted on
                if (type == FrameType.Error)
                    throw new ProtocolException($"source aborted the migration: {ErrorMessage.Parse(payload).Text}");
                if (state != State.AwaitHello && !provisioned)
                {
                    // What grows with the claim — threads, the hash array — is made once the source goes
                    // on past its Hello: a Hello alone costs its reservation and a sparse mapping.
                    provisioned = true;
                    // Placing on its own thread overlaps the socket with the memory; with post-copy
                    // possible the hand-over needs the single-threaded placer.
                    if (_options.PlacingThread && (hello.Requested & Capabilities.PostCopy) == 0) placing = new PlacingThread(placer!);
                    if ((hello.Requested & Capabilities.Verify) != 0) placer!.Hashes = new PageHashes(memory!.PageCount);
                    // The vCPU threads wait from now on, so restoring the VM in the downtime (pre-copy's or post-copy's switch) creates none.
                    vcpuThreads = factory.PrepareThreads(incoming);
                    // And post-copy's fault service (thread, descriptor), so that the switch only registers the memory.
                    postCopy?.Prepare(memory!);
                }
                switch (state, type)
                {
                    case (State.AwaitHello, FrameType.Hello):
                        hello = HelloMessage.Parse(payload);
                        Refuse(CheckHello(hello));
                        // Nothing is allocated for a VM (memory, hashes, threads) before its size and name are reserved.
                        Refuse(Reserve(hello));
                        factory = Factory(hello.VmKind)!;
                        incoming = Incoming(hello);
                        Refuse(factory.Refusal(incoming));
                        // The restore and resume code (and post-copy's switch, if it may come) compiles while the pages arrive.
                        if ((hello.Requested & Capabilities.PostCopy) != 0) SwitchoverWarmup.ForPostCopyDestination(factory);
                        else SwitchoverWarmup.ForDestination(factory);
                        try { (memory, preparedMemory) = factory.CreateMemory(incoming); }
                        catch (IOException e) { throw new RefusedException($"cannot allocate {Units.Bytes(hello.MemoryBytes)} of guest memory: {e.Message}"); }
                        catch (VmFailedException e) { throw new RefusedException(e.Message); }
                        created = true;
                        placer = new PageBatchReader(memory);
                        // Unchecked frames only where TLS authenticates every byte.
                        accepted = hello.Requested & Supported & (IsSecured(stream) ? All : ~Capabilities.TlsUnchecked);
                        reader.PageBatchCheck = PageBatchChecks.Of(accepted);
                        (report.Hello, report.Accepted) = (hello, accepted);
                        if ((accepted & CodecBits) != 0)
                        {
                            // Pre-copy only: the store is filled once the VM runs here, off the migration's clock.
                            decoder = new PipelineDecoder(memory, accepted, (accepted & Capabilities.Dedup) != 0 ? _options.DedupStore : null)
                            {
                                IndexPlacedPages = (hello.Requested & Capabilities.PostCopy) != 0,
                            };
                            placer.Decoder = decoder;
                        }
                        var ack = new HelloAckMessage(Math.Min(hello.MaxVersion, ProtocolVersion.Version), accepted);
                        if ((ack.Accepted & Capabilities.PostCopy) != 0) postCopy = PostCopyIncoming.Register(_sessions, hello, _options);
                        if ((ack.Accepted & Capabilities.PreCopyResume) != 0)
                        {
                            resumption = PreCopyResumption.Register(_sessions, hello.MigrationId, stream);
                            placer.Delivered = new PageBitmap(memory.PageCount);
                        }
                        frames.Send(FrameType.HelloAck, small[..ack.Write(small)]);
                        state = State.Live;
                        _arrival?.Phase("live");
                        break;
                    case (State.Live, FrameType.DedupQuery):
                        if ((accepted & Capabilities.Dedup) == 0) throw new ProtocolException($"DedupQuery (frame {frame}) without the Dedup capability");
                        if (currentRound >= 0) throw new ProtocolException($"DedupQuery (frame {frame}) after round 0 started");
                        var filledPages = decoder!.Fill(payload, p => placer!.Hashes?.Set(p, memory!.Page(p)));
                        long filledCount = filledPages.Count(f => f);
                        placer!.Counters.AddPages(PageEncoding.Dedup, filledCount);
                        report.GangFilled += filledCount;
                        var answer = new byte[4 + (filledPages.Length + 7) / 8];
                        frames.Send(FrameType.DedupAnswer, answer.AsSpan(0, DedupAnswer.Write(answer, filledPages)));
                        break;
                    case (State.AwaitHello, FrameType.StreamAttach):
                        IncomingStreams.ServeAttach(_sessions, payload, stream, reader, frames);
                        return null;
                    case (State.Live, FrameType.Streams):
                        int count = StreamsMessage.Parse(payload, "Streams").Count;
                        if ((accepted & Capabilities.MultiStream) == 0 || postCopy is not null) throw new ProtocolException($"Streams (frame {frame}) without the MultiStream capability, or with post-copy");
                        if (currentRound >= 0 || streams is not null) throw new ProtocolException($"Streams (frame {frame}) after round 0 began, or twice");
                        if (resumption is not null) throw new ProtocolException($"Streams (frame {frame}) with pre-copy resume: a multi-stream migration is not resumed after a drop");
                        if (count < 2 || count > StreamLayout.MaxStreams) throw new RefusedException($"{count} data streams requested; this destination accepts 2..{StreamLayout.MaxStreams}");
                        streams = IncomingStreams.Open(_sessions, hello.MigrationId, count, memory!, placer!.Hashes, decoder, accepted, (accepted & Capabilities.Dedup) != 0 ? _options.DedupStore : null, _options);
                        frames.Send(FrameType.StreamsAck, small[..new StreamsMessage(count).Write(small)]);
                        break;
                    case (State.AwaitHello, FrameType.Attach):
                        var attach = AttachMessage.Parse(payload);
                        if (attach.Channel == ChannelKind.Main && PreCopyResumption.IsKnown(_sessions, attach.MigrationId))
                            PreCopyResumption.ServeAttach(_sessions, attach.MigrationId, stream, reader, frames);
                        else
                            PostCopyIncoming.ServeAttach(_sessions, attach, stream, reader, frames);
                        return null;
                    case (State.Live, FrameType.PostCopyStart) when postCopy is not null:
                        report.BytesOnWire = bytesOfEarlierLinks;
                        _arrival?.SetStrategy(report.Rounds.Count > 0 ? "hybrid" : "postcopy");
                        _arrival?.Phase("post-copy");
                        var handover = new PostCopyHandover(stream, reader, frames, memory!, placer!, hello, factory, incoming, report, currentRound, vcpuThreads);
                        memory = null; // post-copy owns it now
                        vcpuThreads = null; // and the parked threads
                        return postCopy.Run(handover, payload);
                    case (State.Live, FrameType.RoundStart):
                        var rs = RoundStartMessage.Parse(payload);
                        // After a reattach the source goes on with its own round numbers: the round cut short is not repeated.
                        if (afterReattach ? rs.Round <= currentRound : rs.Round != currentRound + 1) throw new ProtocolException($"RoundStart (frame {frame}): round {rs.Round} after round {currentRound}");
                        if (factory.ArrivalFailure(incoming) is { } lost) throw new VmFailedException(lost);
                        currentRound = rs.Round;
                        afterReattach = false;
                        placer!.Delivered?.ClearAll();
                        placedBeforeRound = Placed(placer, streams);
                        _arrival?.DestinationRoundStarted(rs.Round, rs.Final);
                        if (rs.Final) { state = State.StopAndCopy; report.PausedTs = _options.Time.GetTimestamp(); downtime.Start(report.PausedTs); }
                        break;
                    case (State.Live or State.StopAndCopy, FrameType.PageBatch):
                        if (currentRound < 0) throw new ProtocolException($"PageBatch (frame {frame}) before any RoundStart");
                        if (streams is not null) throw new ProtocolException($"PageBatch (frame {frame}) on the control connection of a multi-stream migration");
                        int round = payload.Length >= 4 ? (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(payload) : -1;
                        if (payload.Length >= PageBatchWriter.BatchHeaderSize && round != currentRound) throw new ProtocolException($"PageBatch (frame {frame}) of round {round} inside round {currentRound}");
                        if (placing is not null) placing.Enqueue(reader, frame, payload.Length);
                        else placer!.Apply(payload, frame, reader.EntryHashes);
                        _arrival?.Received(bytesOfEarlierLinks + reader.BytesRead, Placed(placer!, streams) - placedBeforeRound);
                        break;
                    case (State.Live or State.StopAndCopy, FrameType.RoundEnd):
                        var re = RoundEndMessage.Parse(payload);
                        if (prefaulter is not null) { streams?.SetPlaced(null); prefaulter.Dispose(); prefaulter = null; placer!.Placed = null; } // round 0 is in
                        if (re.Round != currentRound) throw new ProtocolException($"RoundEnd (frame {frame}) for round {re.Round} inside round {currentRound}");
                        report.FirstRoundPlaced(Placed(placer!, streams)); // hybrid's live rounds have no Sync
                        report.Rounds.Add(new RoundReport
                        {
                            Round = re.Round, Final = state == State.StopAndCopy, PagesSent = re.PagesSent, PagesDirtied = re.PagesDirtied, BytesSent = re.BytesSent,
                            DurationMs = re.DurationUs / 1000.0, BandwidthBytesPerSecond = re.BytesSent / Math.Max(re.DurationUs / 1e6, 1e-6),
                        });
                        if (state == State.StopAndCopy) downtime.Mark("final-round");
                        _arrival?.DestinationRoundEnded(re.PagesSent, re.PagesDirtied, re.BytesSent, re.DurationUs / 1000.0);
                        break;
                    case (State.Live, FrameType.Extents):
                        if ((accepted & Capabilities.Extents) == 0) throw new ProtocolException($"Extents (frame {frame}) without the Extents capability");
                        if (currentRound >= 0 || extentsSeen) throw new ProtocolException($"Extents (frame {frame}) after round 0 began, or twice");
                        extentsSeen = true;
                        var announced = ExtentsMessage.Parse(payload, memory!.PageCount);
                        _arrival?.Announced(announced.Sum(e => e.Count));
                        if (_options.Prefault && !preparedMemory) // prepared memory is populated already
                        {
                            prefaulter = new Prefaulter(memory, announced);
                            placer!.Placed = prefaulter.Placed;
                            streams?.SetPlaced(prefaulter.Placed);
                        }
                        break;
                    case (State.Live, FrameType.Sync) when currentRound < 0 && postCopy is not null && SyncMessage.Parse(payload, "Sync").Round == SyncMessage.BeforeRounds:
                        // Pure post-copy's preamble: this first frame after the Hello provisioned the
                        // migration (above) while the source still runs; the acknowledgement tells it so.
                        frames.Send(FrameType.SyncAck, small[..new SyncMessage(SyncMessage.BeforeRounds).Write(small)]);
                        break;
                    case (State.Live, FrameType.Sync):
                        var sync = SyncMessage.Parse(payload, "Sync");
                        if (sync.Round != currentRound) throw new ProtocolException($"Sync (frame {frame}) for round {sync.Round} inside round {currentRound}");
                        if (factory.ArrivalFailure(incoming) is { } gone) throw new VmFailedException(gone);
                        // Everything before this frame is placed (on every data stream, too): acknowledge, so the source times the round by delivery.
                        streams?.WaitRound(sync.Round);
                        report.FirstRoundPlaced(Placed(placer!, streams)); // every stream is done with the round and none has begun the next
                        frames.Send(FrameType.SyncAck, small[..sync.Write(small)]);
                        break;
                    case (State.StopAndCopy or State.ReceivingState, FrameType.VmState):
                        state = State.ReceivingState;
                        if (!stateChunks.Add(payload, frame)) break;
                        vmState = stateChunks.State;
                        report.VmStateBytes = stateChunks.WireBytes;
                        state = State.HaveState;
                        downtime.Mark("vm-state");
                        // Rebuild the VM now, while the source combines its hash: its vCPUs stay parked until Commit.
                        // Not with several data streams: their final-round pages may still be arriving (they
                        // are all placed only at Prepare), and restoring reads memory.
                        if (streams is null && !_options.VerifyFromScratch && TryRestoreEarly(factory, incoming, memory!, vmState, vcpuThreads, out restoreError) is { } early) { vm = early; memory = null; }
                        downtime.Mark("restore");
                        break;
                    case (State.HaveState, FrameType.Prepare):
                        var prep = PrepareMessage.Parse(payload);
                        streams?.Finish(currentRound); // every data stream has placed the final round, and stopped
                        (report.StopReason, report.FreePagesSkipped) = (prep.StopReason, prep.FreePagesSkipped);
                        downtime.Mark("await-prepare");
                        ulong hash = 0;
                        if (prep.Verify)
                        {
                            if (placer!.Hashes is null) throw new ProtocolException($"Prepare (frame {frame}) asks for verification that the Hello did not negotiate");
                            long h0 = _options.Time.GetTimestamp();
                            // Each page was hashed from this memory right after it was placed, and
                            // nothing else writes here before resume: this is the memory's hash.
                            hash = placer.Hashes.Combine();
                            (report.DestinationHash, report.SourceHash) = (hash, prep.SourceHash);
                            if (_options.VerifyFromScratch && (vm?.Memory ?? memory)!.ComputeHash() != hash)
                                throw new VerificationException($"verification failed: destination memory rehashed from scratch differs from its per-page hashes {hash:x16}");
                            report.VerifyMs = _options.Time.GetElapsedTime(h0).TotalMilliseconds;
                            if (hash != prep.SourceHash)
                            {
                                SendError(frames, ErrorMessage.VerificationFailed, $"verification failed: destination memory hash {hash:x16} differs from the source's {prep.SourceHash:x16}");
                                throw new VerificationException($"verification failed: destination memory hash {hash:x16} differs from the source's {prep.SourceHash:x16}");
                            }
                            report.Verified = true;
                        }
                        downtime.Mark("hash-combine");
                        // A state that could not be restored is refused here, after verification (which comes first).
                        if (restoreError is not null) throw new ProtocolException(restoreError);
                        if (vm is null)
                        {
                            try { vm = factory.Restore(incoming, memory!, vmState, vcpuThreads); }
                            catch (InvalidDataException e) { throw new ProtocolException(e.Message); }
                            memory = null; // the VM owns it now
                            downtime.Mark("restore");
                        }
                        var readyMsg = new ReadyMessage(hash, (long)(report.VerifyMs * 1000));
                        frames.Send(FrameType.Ready, small[..readyMsg.Write(small)]);
                        downtime.Mark("send-ready");
                        state = State.Prepared;
                        break;
                    case (State.Prepared, FrameType.Commit):
                        if (payload.Length != 0) throw new ProtocolException($"Commit (frame {frame}) carries {payload.Length} bytes");
                        downtime.Mark("await-commit");
                        _options.BeforeResume?.Invoke(vm!);
                        downtime.Mark("before-resume");
                        vm!.Resume();
                        long resumedTs = _options.Time.GetTimestamp();
                        downtime.Mark("resume");
                        // The VM runs here now. A lost Resumed only costs the source its acknowledgement.
                        try { frames.Send(FrameType.Resumed, []); } catch (IOException) { }
                        (report.Vm, report.ResumedTs, report.EndTs) = (vm, resumedTs, resumedTs);
                        report.DowntimeBreakdown = new DowntimeBreakdown { Destination = downtime.Phases, DestinationJitMs = downtime.JitMs };
                        RecordPages(report, placer!, decoder, streams, bytesOfEarlierLinks + reader.BytesRead);
                        decoder?.Dispose();
                        streams?.DisposeDecoders();
                        // A source that could have switched to post-copy (--on-stall postcopy) did not: its page-request connection goes.
                        postCopy?.Abort();
                        var arrived = new ArrivedVm(vm, report.Build(null));
                        // The source has its Resumed: what the decoders deferred goes into the store now, for later gang migrations.
                        if (decoder is { IndexPlacedPages: false } && (accepted & Capabilities.Dedup) != 0) _options.DedupStore.AddArrived(vm.Memory, decoder.Received);
                        return arrived;
                    case (State.ReceivingState, _):
                        throw stateChunks.Interrupted(type, frame);
                    default:
                        throw new ProtocolException($"unexpected {type} (frame {frame}) in state {state}");
                }
              }
              catch (Exception e) when (resumption is not null && state is State.Live or State.StopAndCopy or State.ReceivingState or State.HaveState && LinkFailure.Is(e))
              {
                // The source may come back (it keeps its VM running meanwhile): keep the partial VM
                // for the resume window. What was placed stays; the source re-sends everything it
                // cannot know arrived, and a paused-then-resumed VM is live again: back to Live.
                placing?.Drain(); // what arrived intact is placed (and marked delivered) before the source is told
                _arrival?.Phase("reconnecting");
                var next = resumption.AwaitReattach(_options.ResumeWindow)
                    ?? throw new IOException($"{e.Message}; the source did not come back within the resume window of {_options.ResumeWindow.TotalSeconds:0.#} s", e);
                bytesOfEarlierLinks += reader.BytesRead;
                if ((accepted & Capabilities.TlsUnchecked) != 0 && !IsSecured(next.Stream)) throw new IOException($"{e.Message}; the source came back on a connection without TLS, but the migration negotiated unchecked frames under TLS", e);
                reader = next.Reader;
                reader.PageBatchCheck = PageBatchChecks.Of(accepted);
                frames = next.Frames;
                stream = next.Stream;
                state = State.Live;
                vmState = null;
                stateChunks.Reset();
                report.PausedTs = 0;
                // A VM restored early (at VmState) never ran: undo it, its memory takes pages again.
                if (vm is not null) { memory = factory.Unrestore(vm); vm = null; }
                restoreError = null;
                afterReattach = true;
                report.Reconnects++;
                _arrival?.Phase("live");
                // What arrived of the round cut short: the source sends only the rest again.
                if (currentRound >= 0) DeliveredMessage.Send(frames, currentRound, placer!.Delivered!);
                frames.Send(FrameType.Attached, small[..new AttachedMessage(ChannelKind.Main, false).Write(small)]);
              }
            }
        }
        catch (Exception e) when (e is ProtocolException or IOException or RefusedException or VerificationException or SocketException or VmFailedException)
        {
            placing?.Dispose(); // no page is placed once the memory may be discarded
            placing = null;
            prefaulter?.Dispose();
            vcpuThreads?.Dispose();
            // No data stream may touch the memory once it is discarded: stop them all first.
            try { streams?.Abort(e.Message); }
            catch (ProtocolException) { memory = null; if (vm is not null) { factory.Unrestore(vm); vm = null; } } // a stream thread did not stop: leak the memory rather than unmap it under it
            if (placer is not null) RecordPages(report, placer, decoder, streams, bytesOfEarlierLinks + reader.BytesRead);
            else report.BytesOnWire = reader.BytesRead;
            streams?.DisposeDecoders();
            decoder?.Dispose();
            decoder = null;
            // Discard the partial VM: it never ran here.
            postCopy?.Abort();
            vm?.Dispose();
            if (vm is null && created) factory.Discard(incoming); // e.g. the QEMU waiting for its state: gone before the source hears of the failure
            memory?.Dispose();
            if (e is ProtocolException or RefusedException or VmFailedException) SendError(frames, e is RefusedException ? ErrorMessage.Refused : ErrorMessage.BadStream, e.Message);
            if (e is VerificationException) report.Verified = false;
            throw new MigrationFailedException(e.Message, report.Build(e.Message), e);
        }
        finally
        {
            placing?.Dispose();
            // Gives back a connection lent by a reattach (its own thread closes it).
            resumption?.Close();
        }
    }

    /// <summary>Restores the VM from its state as soon as it arrives; on hostile state bytes, null and why (refused at Prepare, after verification).</summary>
    private static IVirtualMachine? TryRestoreEarly(IVmFactory factory, IncomingVm incoming, GuestMemory memory, byte[] state, ParkedThreads? threads, out string? error)
    {
        error = null;
        try { return factory.Restore(incoming, memory, state, threads); }
        catch (InvalidDataException e) { error = e.Message; return null; }
    }

    /// <summary>This destination's factory for VMs of <paramref name="kind"/>, or null.</summary>
    private IVmFactory? Factory(string kind) => _options.VmFactories.FirstOrDefault(f => f.Kind == kind);

    private IncomingVm Incoming(HelloMessage h) => new()
    {
        MigrationId = h.MigrationId, Name = h.VmName, Kind = h.VmKind, MemoryBytes = h.MemoryBytes, Vcpus = h.Vcpus, Spec = h.VmSpec,
        DirtyLog = _options.DirtyLog, MemoryPool = _options.MemoryPool, Time = _options.Time,
        MayPostCopy = (h.Requested & Capabilities.PostCopy) != 0,
    };

    private const Capabilities All = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Verify | Capabilities.RoundSync | Capabilities.Extents | Capabilities.PostCopy | Capabilities.LateZeros | Capabilities.PreCopyResume | Capabilities.MultiStream
        | Capabilities.PageHashCheck | Capabilities.TlsUnchecked | CodecBits;

    internal static bool IsSecured(Stream stream) => ChannelSecurity.IsSecured(stream);

    /// <summary>Pages placed on the control connection and on every data stream.</summary>
    private static long Placed(PageBatchReader placer, IncomingStreams? streams) => placer.PagesPlaced + (streams?.PagesPlaced ?? 0);

    /// <summary>What the page path did, for the report: counts by encoding, stages, pages placed, bytes read (all connections).</summary>
    private static void RecordPages(DestinationReport report, PageBatchReader placer, PipelineDecoder? decoder, IncomingStreams? streams, long controlBytes)
    {
        report.Pages.Merge(placer.Counters);
        streams?.AddCountersTo(report.Pages);
        report.Stages = streams is null ? decoder?.Report() ?? [] : streams.MergeStages(decoder?.Report() ?? []);
        report.PagesPlaced = Placed(placer, streams);
        report.Streams = streams?.Count ?? 1;
        report.BytesOnWire = controlBytes + (streams?.BytesRead ?? 0);
    }

    private const Capabilities CodecBits = Capabilities.Lz4 | Capabilities.Zstd | Capabilities.Xbzrle | Capabilities.Dedup;

    /// <summary>What this destination accepts: everything it implements less what its options disable.</summary>
    private Capabilities Supported => All & ~_options.Disabled & (_options.ResumeWindow > TimeSpan.Zero ? All : ~Capabilities.PreCopyResume);

    private string? CheckHello(HelloMessage h)
    {
        if (h.MaxVersion < ProtocolVersion.MinSupported || h.MinVersion > ProtocolVersion.Version)
            return $"protocol version mismatch: source speaks {h.MinVersion}..{h.MaxVersion}, destination {ProtocolVersion.MinSupported}..{ProtocolVersion.Version}";
        if (Factory(h.VmKind) is null) return $"VM kind '{h.VmKind}' is not supported here (supported: {string.Join(", ", _options.VmFactories.Select(f => f.Kind))})";
        if (h.PageSize != GuestMemory.PageSize) return $"page size {h.PageSize} not supported (only {GuestMemory.PageSize})";
        if (h.MemoryBytes <= 0 || h.MemoryBytes % GuestMemory.PageSize != 0) return $"memory size {h.MemoryBytes} is not a positive multiple of the page size";
        if (h.MemoryBytes > _options.MaxMemoryBytes) return $"memory size {Units.Bytes(h.MemoryBytes)} exceeds this destination's limit of {Units.Bytes(_options.MaxMemoryBytes)}";
        if (h.MemoryBytes / GuestMemory.PageSize > uint.MaxValue) return "memory larger than 16 TiB is not supported";
        if (h.Vcpus < 1 || h.Vcpus > 1024) return $"{h.Vcpus} vCPUs is out of range (1..1024)";
        if ((h.Required & ~h.Requested) != 0) return $"the Hello requires capabilities it does not request: {h.Required & ~h.Requested}";
        var missing = h.Required & ~Supported;
        if (missing != 0) return $"destination lacks required capabilities: {missing}";
        return null;
    }

    /// <summary>Reserves the VM's size in the memory budget and takes its name in the registry for this migration; why not, when it does not fit or a VM of that name runs or arrives here.</summary>
    private string? Reserve(HelloMessage h)
    {
        _budget = _options.MemoryBudget.TryReserve(h.MemoryBytes, out string? overBudget);
        if (overBudget is not null) return overBudget;
        if (_vms is null) return null;
        var arriving = new MigrationProgress(h.MigrationId, "destination", "precopy", h.VmName, h.MemoryBytes, "", _options.Time);
        if (_vms.TryReserve(arriving) is { } why) return why;
        _arrival = arriving;
        return null;
    }

    private static void Refuse(string? why)
    {
        if (why is not null) throw new RefusedException(why);
    }

    private static void SendError(FrameWriter frames, ushort code, string text)
    {
        try
        {
            if (frames.IsOpen) frames.Abandon();
            Span<byte> buf = stackalloc byte[4100];
            frames.Send(FrameType.Error, buf[..new ErrorMessage(code, text).Write(buf)]);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException) { }
    }

    private sealed class RefusedException(string message) : Exception("refused: " + message);
    private sealed class VerificationException(string message) : Exception(message);
}
