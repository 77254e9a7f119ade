using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Simulation;

/// <summary>
/// A modelled guest for the <see cref="Core.RoundController"/>: its dirty log and its brakes over
/// an <see cref="IDirtyProcess"/>. The guest has a progress clock — seconds of work done — that
/// runs with virtual time, slower while braked: at speed (1 − throttle) under auto-converge's CPU
/// throttle (a vCPU sleeps that share of the time, as QEMU's), and at most limit × vCPUs ÷ the
/// process's write rate under a dirty limit (a vCPU over its budget sleeps). The process writes
/// by progress, so braking a trace replays it slower and braking a hand model writes less per
/// second — and the work lost shows in <see cref="Operations"/>, as on a real VM. A brake takes
/// effect from the instant it is set; once paused the guest does no more work. Reads time only
/// from the clock it is given.
/// </summary>
public sealed class SimGuest : IDirtyLog, IGuestBrakes
{
    private readonly TimeProvider _time;
    private readonly IDirtyProcess _process;
    private long _lastTs, _stalledUntil;
    private double _progress, _writtenUpTo, _throttle, _dirtyLimit;
    private bool _paused;

    /// <param name="startProgress">Work the guest has done when this model of it starts (where a trace starts, or how long the VM ran before).</param>
    /// <param name="trackWritten">Keep <see cref="EverWritten"/> (for a content model that must know which pages are no longer as the image had them).</param>
    public SimGuest(TimeProvider time, IDirtyProcess process, int vcpus, long pageCount, double startProgress = 0, bool trackWritten = false)
    {
        if (trackWritten) EverWritten = PageBitmap.Compact(pageCount);
        ArgumentOutOfRangeException.ThrowIfLessThan(vcpus, 1);
        if (process.PageCount > pageCount) throw new ArgumentException($"the dirty process uses {process.PageCount} pages, the memory has {pageCount}", nameof(process));
        _time = time;
        _process = process;
        Vcpus = vcpus;
        PageCount = pageCount;
        _lastTs = time.GetTimestamp();
        _progress = _writtenUpTo = startProgress;
    }

    public string Name => "model";
    public int Vcpus { get; }
    public long PageCount { get; }
    public bool IsTracking { get; private set; }
    public bool Paused => _paused;
    public IDirtyProcess Process => _process;
    /// <summary>Every page the guest has written since it started (tracked or not), when asked for; else null.</summary>
    public PageBitmap? EverWritten { get; }

    /// <summary>Progress now: seconds of work done.</summary>
    public double Progress
    {
        get
        {
            if (_paused) return _progress;
            long now = _time.GetTimestamp(), from = Math.Max(_lastTs, _stalledUntil);
            if (now <= from) return _progress;
            double dt = _time.GetElapsedTime(from, now).TotalSeconds;
            return _progress + dt * Speed(_progress);
        }
    }

    /// <summary>Seconds of work per second of time, with the brakes in force.</summary>
    public double Speed(double at)
    {
        double speed = 1 - _throttle;
        if (_dirtyLimit > 0)
        {
            double rate = _process.RateAt(at);
            if (rate > _dirtyLimit * Vcpus) speed *= _dirtyLimit * Vcpus / rate;
        }
        return speed;
    }

    /// <summary>Banks the progress made at the old speed before anything changes it.</summary>
    private void Settle()
    {
        _progress = Progress;
        _lastTs = _time.GetTimestamp();
    }

    public void Start()
    {
        Settle();
        _process.Write(_writtenUpTo, _progress, EverWritten); // the work done before tracking: content moves on, no page is dirty
        _writtenUpTo = _progress;
        IsTracking = true;
    }

    public void Stop() => IsTracking = false;

    /// <summary>Sets the pages written since the last harvest (or since <see cref="Start"/>).</summary>
    public long Harvest(PageBitmap into)
    {
        Settle();
        long n = _process.Write(_writtenUpTo, _progress, into);
        _writtenUpTo = _progress;
        EverWritten?.Or(into); // into may hold more than this harvest (the final one goes into the pending set): pages written before anyway
        return n;
    }

    /// <summary>The guest stops doing work (stop-and-copy): what it wrote until now is still in the log for the final harvest.</summary>
    public void Pause()
    {
        Settle();
        _paused = true;
    }

    /// <summary>The guest runs again (at the destination after a switch-over), unbraked from now.</summary>
    public void Resume()
    {
        _lastTs = _time.GetTimestamp();
        _paused = false;
    }

    /// <summary>
    /// The vCPUs wait, doing no work, for <paramref name="seconds"/> more (after any wait already
    /// owed): post-copy's demand faults, each vCPU-second of waiting spread over the vCPUs.
    /// </summary>
    public void Stall(double seconds)
    {
        if (!(seconds > 0)) return;
        Settle();
        long now = _time.GetTimestamp();
        long from = Math.Max(now, _stalledUntil);
        _stalledUntil = from + (long)Math.Round(seconds * _time.TimestampFrequency);
        StalledSeconds += seconds;
    }

    /// <summary>Seconds the guest has waited in <see cref="Stall"/> in all.</summary>
    public double StalledSeconds { get; private set; }

    public void Throttle(double fraction)
    {
        Settle();
        _throttle = Math.Clamp(double.IsNaN(fraction) ? 0 : fraction, 0, 0.99);
    }

    public double ThrottleFraction => _throttle;

    public void LimitDirtyRate(double pagesPerSecondPerVcpu)
    {
        Settle();
        _dirtyLimit = double.IsNaN(pagesPerSecondPerVcpu) || pagesPerSecondPerVcpu <= 0 ? 0 : pagesPerSecondPerVcpu;
    }

    public double DirtyRateLimit => _dirtyLimit;

    /// <summary>Page writes done so far: the guest's progress counter (each operation a page write, as the built-in VM counts them).</summary>
    public long Operations => (long)_process.WritesUpTo(Progress);

    public void Dispose() { }
}
