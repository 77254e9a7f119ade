namespace LiveMig.Vm;

/// <summary>
/// The brakes' arithmetic for one vCPU of the built-in VM, apart from its thread and its clock:
/// given what the vCPU did and when, how long it must sleep. Kept apart so the dirty limit and the
/// throttle are checked exactly on made-up timestamps, not by timing real threads on a loaded
/// machine.
/// <list type="bullet">
/// <item>Dirty limit (QEMU's dirty-limit): a credit of page writes grows at the limit per second,
/// capped at <see cref="DirtyLimitBurstSeconds"/> of it; each write spends one; in debt the vCPU
/// sleeps until the credit is back to zero.</item>
/// <item>Throttle (QEMU's auto-converge CPU throttle): after <see cref="Timeslice"/> of running the
/// vCPU sleeps fraction/(1−fraction) timeslices, so it runs (1−fraction) of the time.</item>
/// </list>
/// </summary>
internal struct VcpuPacer(long timestampFrequency)
{
    /// <summary>Time a throttled vCPU runs between sleeps (QEMU's CPU_THROTTLE_TIMESLICE_NS).</summary>
    public static readonly TimeSpan Timeslice = TimeSpan.FromMilliseconds(10);

    /// <summary>Page writes a dirty-limited vCPU may bank while it writes less than its limit.</summary>
    public const double DirtyLimitBurstSeconds = 0.01;

    /// <summary>Debts shorter than this are carried, not slept: sleeps are about that coarse.</summary>
    private const double MinimumDozeMs = 1;

    private readonly long _frequency = timestampFrequency;
    private long _sliceStart, _budgetTs;
    private double _budget;

    /// <summary>Starts afresh at <paramref name="now"/> (first run, and after every pause): no credit, no debt, a new timeslice.</summary>
    public void Restart(long now)
    {
        _sliceStart = _budgetTs = now;
        _budget = 0;
    }

    /// <summary>
    /// Books <paramref name="writes"/> page writes done by <paramref name="now"/> under a limit of
    /// <paramref name="limit"/> writes per second (0: none) and returns the milliseconds to sleep
    /// to repay the debt (0: go on).
    /// </summary>
    public double DirtyLimitDoze(int writes, long now, double limit)
    {
        if (limit <= 0)
        {
            _budget = 0;
            _budgetTs = now;
            return 0;
        }
        double earned = (now - _budgetTs) * limit / _frequency;
        _budget = Math.Min(_budget + earned, Math.Max(1, limit * DirtyLimitBurstSeconds)) - writes;
        _budgetTs = now;
        double debtMs = -_budget / limit * 1000;
        return debtMs >= MinimumDozeMs ? debtMs : 0;
    }

    /// <summary>
    /// The throttle's sleep due at <paramref name="now"/> for <paramref name="fraction"/> (0: none):
    /// 0 while the timeslice lasts, else fraction/(1−fraction) timeslices. Call
    /// <see cref="SliceStarted"/> when the vCPU runs again after that sleep.
    /// </summary>
    public double ThrottleDoze(long now, double fraction)
    {
        if (fraction <= 0)
        {
            _sliceStart = now;
            return 0;
        }
        long timeslice = (long)(Timeslice.TotalSeconds * _frequency);
        return now - _sliceStart >= timeslice ? Timeslice.TotalMilliseconds * fraction / (1 - fraction) : 0;
    }

    /// <summary>A new timeslice begins at <paramref name="now"/> (after the throttle's sleep).</summary>
    public void SliceStarted(long now) => _sliceStart = now;
}
