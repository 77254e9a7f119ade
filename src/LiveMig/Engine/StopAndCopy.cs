using LiveMig.Core;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// Pre-copy's switch-over, for every engine whose rounds end in a stop-and-copy: pause, send the
/// last dirty pages and the VM state, have the destination verify (Prepare → Ready), then hand
/// the VM over (Commit → Resumed). Until <see cref="Commit"/> the caller may resume the VM here;
/// after it, never. Each step of the pause is timed for the report's downtime breakdown.
/// </summary>
internal sealed class StopAndCopy(IVirtualMachine vm, RoundController controller, ConnectionRoundSender sender, SourcePipeline? pipeline,
    bool verify, TimeProvider time, IMigrationObserver observer)
{
    private readonly PhaseClock _downtime = new(time);
    private long _pauseTs, _resumedTs;
    private double _pauseBarrierMs, _verifyMs;

    public bool Paused { get; private set; }
    public bool Committed { get; private set; }
    /// <summary>The destination refused or contradicted the verification.</summary>
    public bool HashesDiffer { get; private set; }
    public ulong SourceHash { get; private set; }
    public ReadyMessage Ready { get; private set; }
    /// <summary>Bytes the VM state took on the wire (0 until sent).</summary>
    public long StateBytes { get; private set; }

    /// <summary>Pause, send the rest and the VM state, and have the destination verify and prepare (Prepare → Ready).</summary>
    public void PauseAndPrepare()
    {
        observer.Phase("paused");
        long pauseAsked = time.GetTimestamp();
        vm.Pause();
        _pauseTs = time.GetTimestamp();
        Paused = true;
        _pauseBarrierMs = time.GetElapsedTime(pauseAsked, _pauseTs).TotalMilliseconds;
        _downtime.Start(_pauseTs);
        // Paused, a throttle or limit has nothing left to do: release it now, so the guest
        // never runs slowed again here (a failed switch-over resumes it) and its saved state is clean.
        controller.ReleaseBrakes();
        if (pipeline is not null) pipeline.Paused = true;
        _downtime.Mark("release-brakes");
        long finalCount = controller.HarvestFinal();
        _downtime.Mark("final-harvest");
        var final = controller.SendFinalRound(finalCount);
        _downtime.Mark("final-round");
        controller.RecordFinalRound(final); // the progress display hears of it
        _downtime.Mark("observer");
        SendState();
        Prepare();
    }

    private void SendState()
    {
        byte[] state = vm.SaveState();
        _downtime.Mark("save-state");
        StateBytes = VmStateChunks.Send(sender.Frames, state);
        sender.StateBytes = StateBytes;
        _downtime.Mark("send-vm-state");
        if (sender.Batches.Hashes is { } hashes)
        {
            // Every page's hash was taken as it was sent, and the final round re-sent every
            // page written since: the per-page hashes now describe the paused memory exactly.
            long h0 = time.GetTimestamp();
            SourceHash = hashes.Combine();
            _verifyMs = time.GetElapsedTime(h0).TotalMilliseconds;
        }
        _downtime.Mark("hash-combine");
    }

    private void Prepare()
    {
        Span<byte> small = stackalloc byte[64];
        // The stop reason and the free pages never sent travel too: the destination's report shows what the source's does.
        var prepare = new PrepareMessage(verify, SourceHash, controller.PagesSent, StopReasons.Name(controller.Decision.Reason), sender.Counters().Skipped);
        sender.Frames.Send(FrameType.Prepare, small[..prepare.Write(small)]);
        var type = sender.Reader.Read(out var payload);
        if (type == FrameType.Error)
        {
            var refusal = ErrorMessage.Parse(payload);
            HashesDiffer = refusal.Code == ErrorMessage.VerificationFailed;
            throw new MigrationAbort($"destination aborted before the switch-over: {refusal.Text}");
        }
        if (type != FrameType.Ready) throw new ProtocolException($"expected Ready, got {type}");
        Ready = ReadyMessage.Parse(payload);
        _downtime.Mark("prepare-to-ready");
        if (verify && Ready.DestinationHash != SourceHash)
        {
            HashesDiffer = true;
            throw new MigrationAbort($"destination memory hash {Ready.DestinationHash:x16} differs from the source's {SourceHash:x16}");
        }
    }

    /// <summary>Step 2: from here on the destination may run the VM, so the source never resumes it.</summary>
    public void Commit()
    {
        sender.Frames.Send(FrameType.Commit, []);
        Committed = true;
        var type = sender.Reader.Read(out _);
        if (type != FrameType.Resumed) throw new ProtocolException($"expected Resumed, got {type}");
        _resumedTs = time.GetTimestamp();
        _downtime.Mark("commit-to-resumed");
        observer.Phase("resumed");
        vm.DirtyLog.Stop();
        vm.Stop();
    }

    /// <summary>The link dropped during the pause: the VM runs on here while the engine reconnects (before Commit only).</summary>
    public void ResumeAfterDrop()
    {
        if (!Paused || Committed) return;
        vm.Resume();
        Paused = false;
    }

    /// <summary>The switch-over's part of the report: the downtime and where it went, the verification.</summary>
    public MigrationReport AddTo(MigrationReport r, TimeSpan downtimeLimit)
    {
        if (!Committed || _resumedTs == 0) return r with { Verified = HashesDiffer ? false : null };
        double downtime = time.GetElapsedTime(_pauseTs, _resumedTs).TotalMilliseconds;
        return r with
        {
            DowntimeMs = downtime,
            VerifyMs = _verifyMs + Ready.VerifyUs / 1000.0,
            DowntimeBreakdown = new DowntimeBreakdown { PauseBarrierMs = _pauseBarrierMs, Source = _downtime.Phases, SourceJitMs = _downtime.JitMs },
            Verified = verify ? true : null,
            SourceHash = verify ? $"{SourceHash:x16}" : null,
            DestinationHash = verify ? $"{Ready.DestinationHash:x16}" : null,
            DowntimeExceededMs = controller.Decision.Stalled ? Math.Max(0, downtime - downtimeLimit.TotalMilliseconds) : null,
        };
    }

    /// <summary>When the VM was back on its feet at the destination (0 before Commit completed).</summary>
    public long ResumedTimestamp => _resumedTs;
}
