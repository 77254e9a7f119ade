using LiveMig.DirtyTracking;
using LiveMig.Memory;

namespace LiveMig.Vm;

public enum VmRunState { Created, Running, Paused, Stopped }

/// <summary>What the migration engine needs from a VM, whatever runs it (built-in vCPUs, later QEMU).</summary>
public interface IVirtualMachine : IDisposable
{
    string Name { get; }
    GuestMemory Memory { get; }
    IDirtyLog DirtyLog { get; }
    VmRunState State { get; }

    /// <summary>Stops every vCPU at a barrier; when it returns no vCPU writes guest memory.</summary>
    void Pause();

    void Resume();

    /// <summary>vCPU and device state (everything but guest memory) as bytes; call while paused.</summary>
    byte[] SaveState();

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

    /// <summary>
    /// Free-page hint: marks in <paramref name="into"/> the pages the guest does not use now
    /// (their content does not matter to it), as a balloon driver's free-page reporting does;
    /// returns how many. A page reported free and written later is dirty again like any other.
    /// Default: the guest reports nothing.
    /// </summary>
    long ReportFreePages(PageBitmap into) => 0;
}
