namespace LiveMig.Vm;

/// <summary>
/// What the round controller may do to slow a guest whose rounds do not converge (QEMU's CPU
/// throttle and dirty-limit), and the progress counter that shows what slowing it cost. A VM
/// implements it; the simulator's modelled guest does too.
/// </summary>
public interface IGuestBrakes
{
    /// <summary>Fraction of time (0–0.99) the vCPUs sleep; for auto-converge. 0 releases it.</summary>
    void Throttle(double fraction);

    double ThrottleFraction { get; }

    /// <summary>
    /// Caps each vCPU's rate of page writes (QEMU's dirty-limit): a vCPU that has written more
    /// than its budget sleeps until it is back within it. 0 (or less) lifts the cap.
    /// </summary>
    void LimitDirtyRate(double pagesPerSecondPerVcpu);

    /// <summary>The dirty-rate cap in force, pages/s per vCPU; 0 = none.</summary>
    double DirtyRateLimit { get; }

    /// <summary>Work the guest has done so far (its progress counter), or -1 when the VM cannot tell; lost progress under throttling shows here.</summary>
    long Operations => -1;
}
