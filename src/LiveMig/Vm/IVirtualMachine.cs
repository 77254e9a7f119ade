using LiveMig.DirtyTracking;
using LiveMig.Memory;

namespace LiveMig.Vm;

public enum VmRunState { Created, Running, Paused, Stopped }

/// <summary>What the migration engine needs from a VM, whatever runs it (built-in vCPUs, later QEMU).</summary>
public interface IVirtualMachine : IGuestBrakes, IDisposable
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

    /// <summary>
    /// Free-page hint: marks in <paramref name="into"/> the pages the guest does not use now
    /// (their content does not matter to it), as a balloon driver's free-page reporting does;
    /// returns how many. A page reported free and written later is dirty again like any other.
    /// Default: the guest reports nothing.
    /// </summary>
    long ReportFreePages(PageBitmap into) => 0;
}
