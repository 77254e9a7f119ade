using LiveMig.Vm;

namespace LiveMig.Core;

/// <summary>
/// What slowing the guest cost it: its progress counter's rate from the start of the migration
/// until the first throttle or dirty limit, and from then until the pause; the difference over
/// the throttled time is the work it lost. Null figures when the guest cannot count its work or
/// was never slowed.
/// </summary>
public sealed class ThrottleMeter
{
    private readonly IGuestBrakes _guest;
    private readonly TimeProvider _time;
    private readonly long _t0;
    private readonly long _ops0;
    private long _tOn, _opsOn, _tOff, _opsOff;
    private bool _on, _off;

    public ThrottleMeter(IGuestBrakes guest, TimeProvider time)
    {
        _guest = guest;
        _time = time;
        _t0 = time.GetTimestamp();
        _ops0 = guest.Operations;
    }

    public bool Slowed => _on;

    /// <summary>Call when a throttle or dirty limit is first applied (later calls are ignored).</summary>
    public void SlowedDown()
    {
        if (_on) return;
        _on = true;
        _tOn = _time.GetTimestamp();
        _opsOn = _guest.Operations;
    }

    /// <summary>Call at the pause (or when the guest is released on failure).</summary>
    public void Ended()
    {
        if (!_on || _off) return;
        _off = true;
        _tOff = _time.GetTimestamp();
        _opsOff = _guest.Operations;
    }

    private bool Counts => _ops0 >= 0 && _on && _off;

    private TimeSpan Throttled => _time.GetElapsedTime(_tOn, _tOff);

    public double ThrottledMs => _on && _off ? Throttled.TotalMilliseconds : 0;

    public double? RateBefore => Counts && _tOn > _t0 ? (_opsOn - _ops0) / _time.GetElapsedTime(_t0, _tOn).TotalSeconds : null;

    public double? RateDuring => Counts && _tOff > _tOn ? (_opsOff - _opsOn) / Throttled.TotalSeconds : null;

    public long? OperationsLost => RateBefore is { } before && RateDuring is not null
        ? Math.Max(0, (long)(before * Throttled.TotalSeconds) - (_opsOff - _opsOn))
        : null;
}
