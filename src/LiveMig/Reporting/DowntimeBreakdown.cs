namespace LiveMig.Reporting;

/// <summary>One step of the switch-over, in the order it happened, and how long it took.</summary>
public sealed record DowntimePhase
{
    public string Phase { get; init; } = "";
    public double Ms { get; init; }
}

/// <summary>
/// Where the downtime went, step by step (docs/report.md, <c>downtimeBreakdown</c>). The
/// source's steps add up to its <c>downtimeMs</c>; the destination's start at the final
/// <c>RoundStart</c> it read and add up to its own <c>downtimeMs</c>.
/// </summary>
public sealed record DowntimeBreakdown
{
    /// <summary>Source: from asking the vCPUs to stop until the last one parked (before <c>downtimeMs</c> starts: some vCPUs still ran).</summary>
    public double PauseBarrierMs { get; init; }
    /// <summary>The source's steps from the pause to the <c>Resumed</c> acknowledgement.</summary>
    public List<DowntimePhase> Source { get; init; } = [];
    /// <summary>The destination's steps from the final <c>RoundStart</c> to its resume (in <c>demo</c>, copied into the source's report).</summary>
    public List<DowntimePhase> Destination { get; init; } = [];
    /// <summary>Time the source's migration thread spent compiling methods (JIT) inside its downtime.</summary>
    public double SourceJitMs { get; init; }
    /// <summary>Time the destination's receiving thread spent compiling methods (JIT) inside its downtime.</summary>
    public double DestinationJitMs { get; init; }
    /// <summary>Destination, <c>demo</c> only: from the VM's resume until its first vCPU ran again; null when unknown.</summary>
    public double? VcpuWakeMs { get; init; }
}

/// <summary>Marks for a <see cref="DowntimeBreakdown"/>: each <see cref="Mark"/> records the time since the previous one, on the clock given. Not thread-safe.</summary>
public sealed class PhaseClock(TimeProvider? time = null)
{
    private readonly TimeProvider _time = time ?? TimeProvider.System;
    private readonly List<DowntimePhase> _phases = new(12);
    private long _last;
    private bool _started;
    private TimeSpan _jit0;

    public bool Started => _started;

    /// <summary>Starts (or restarts) at <paramref name="timestamp"/> (a timestamp of the clock given).</summary>
    public void Start(long timestamp)
    {
        _phases.Clear();
        _last = timestamp;
        _started = true;
        _jit0 = System.Runtime.JitInfo.GetCompilationTime(currentThread: true);
    }

    /// <summary>Ends the step called <paramref name="phase"/> now; does nothing before <see cref="Start"/>.</summary>
    public void Mark(string phase)
    {
        if (!_started) return;
        long now = _time.GetTimestamp();
        _phases.Add(new DowntimePhase { Phase = phase, Ms = _time.GetElapsedTime(_last, now).TotalMilliseconds });
        _last = now;
    }

    public List<DowntimePhase> Phases => [.. _phases];

    /// <summary>JIT time of the calling thread since <see cref="Start"/> (call it on the thread that started the clock).</summary>
    public double JitMs => !_started ? 0 : (System.Runtime.JitInfo.GetCompilationTime(currentThread: true) - _jit0).TotalMilliseconds;
}
