using System.Diagnostics;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// What slowing the guest cost it: its progress counter's rate from the start of the migration
/// until the first throttle or dirty limit, and from then until the pause; the difference over
/// the throttled time is the work it lost. Null figures when the VM cannot count its work or
/// was never slowed.
/// </summary>
internal sealed class ThrottleMeter(IVirtualMachine vm)
{
    private readonly long _t0 = Stopwatch.GetTimestamp();
    private readonly long _ops0 = vm.Operations;
    private long _tOn, _opsOn, _tOff, _opsOff;

    public bool Slowed => _tOn != 0;

    /// <summary>Call when a throttle or dirty limit is first applied (later calls are ignored).</summary>
    public void SlowedDown()
    {
        if (_tOn != 0) return;
        _tOn = Stopwatch.GetTimestamp();
        _opsOn = vm.Operations;
    }

    /// <summary>Call at the pause (or when the guest is released on failure).</summary>
    public void Ended()
    {
        if (_tOn == 0 || _tOff != 0) return;
        _tOff = Stopwatch.GetTimestamp();
        _opsOff = vm.Operations;
    }

    private bool Counts => _ops0 >= 0 && _tOn != 0 && _tOff != 0;

    public double ThrottledMs => _tOn != 0 && _tOff != 0 ? Stopwatch.GetElapsedTime(_tOn, _tOff).TotalMilliseconds : 0;

    public double? RateBefore => Counts && _tOn > _t0 ? (_opsOn - _ops0) / Stopwatch.GetElapsedTime(_t0, _tOn).TotalSeconds : null;

    public double? RateDuring => Counts && _tOff > _tOn ? (_opsOff - _opsOn) / Stopwatch.GetElapsedTime(_tOn, _tOff).TotalSeconds : null;

    public long? OperationsLost => RateBefore is { } before && RateDuring is not null
        ? Math.Max(0, (long)(before * Stopwatch.GetElapsedTime(_tOn, _tOff).TotalSeconds) - (_opsOff - _opsOn))
        : null;
}
