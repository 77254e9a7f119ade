using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Simulation;

/// <summary>
/// A modelled guest that writes pages at a constant rate of virtual time, for the
/// <see cref="Core.RoundController"/>: its dirty log marks, at each harvest, the pages written
/// since the last one — rate × elapsed time, the CPU throttle and the dirty limit applied —
/// walking a ring of distinct pages over the writable range from a seeded start, so no page is
/// written twice between two harvests while the range is larger than one interval's writes.
/// Deterministic for a seed; reads time only from the clock it is given.
/// </summary>
public sealed class ModelGuest : IDirtyLog, IGuestBrakes
{
    private readonly TimeProvider _time;
    private readonly long _first, _range;
    private long _next, _lastHarvest, _operations;
    private double _carry, _throttle, _dirtyLimit;

    /// <param name="pagesPerSecond">Page writes per second of virtual time (all vCPUs together).</param>
    /// <param name="writable">Pages [first, first + count) the guest writes; default all.</param>
    public ModelGuest(TimeProvider time, long pageCount, double pagesPerSecond, int vcpus = 1, (long First, long Count)? writable = null, ulong seed = 1)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(pagesPerSecond);
        _time = time;
        PageCount = pageCount;
        PagesPerSecond = pagesPerSecond;
        Vcpus = vcpus;
        (_first, _range) = writable ?? (0, pageCount);
        if (_range <= 0 || _first < 0 || _first + _range > pageCount) throw new ArgumentOutOfRangeException(nameof(writable), "writable range outside memory");
        _next = (long)(seed * 0x9E3779B97F4A7C15UL % (ulong)_range);
    }

    public long PageCount { get; }
    public double PagesPerSecond { get; set; }
    public int Vcpus { get; }
    public string Name => "model";
    public bool IsTracking { get; private set; }

    /// <summary>The rate in force: the dirty limit caps it, the throttle takes its share of the time.</summary>
    public double EffectiveRate
    {
        get
        {
            double rate = _dirtyLimit > 0 ? Math.Min(PagesPerSecond, _dirtyLimit * Vcpus) : PagesPerSecond;
            return rate * (1 - _throttle);
        }
    }

    public void Start()
    {
        IsTracking = true;
        _lastHarvest = _time.GetTimestamp();
        _carry = 0;
    }

    public void Stop() => IsTracking = false;

    public long Harvest(PageBitmap into)
    {
        long now = _time.GetTimestamp();
        double writes = EffectiveRate * _time.GetElapsedTime(_lastHarvest, now).TotalSeconds + _carry;
        _lastHarvest = now;
        long n = (long)Math.Floor(writes);
        _carry = writes - n;
        _operations += n;
        long distinct = Math.Min(n, _range);
        for (long i = 0; i < distinct; i++)
        {
            into.SetUnsynchronized(_first + _next);
            if (++_next == _range) _next = 0;
        }
        return distinct;
    }

    public void Throttle(double fraction) => _throttle = Math.Clamp(double.IsNaN(fraction) ? 0 : fraction, 0, 0.99);
    public double ThrottleFraction => _throttle;
    public void LimitDirtyRate(double pagesPerSecondPerVcpu) => _dirtyLimit = double.IsNaN(pagesPerSecondPerVcpu) || pagesPerSecondPerVcpu <= 0 ? 0 : pagesPerSecondPerVcpu;
    public double DirtyRateLimit => _dirtyLimit;
    public long Operations => _operations;

    public void Dispose() { }
}
