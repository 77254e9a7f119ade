using LiveMig.DirtyTracking;
using LiveMig.Memory;

namespace LiveMig.Vm;

public enum VmRunState { Created, Running, Paused, Stopped }

/// <summary>The convergence brakes a VM can apply (QEMU: cpu-throttle, dirty-limit); a VM that has neither says None.</summary>
[Flags]
public enum VmBrakes
{
    None = 0,
    /// <summary><see cref="IVirtualMachine.Throttle"/> slows the vCPUs (auto-converge).</summary>
    Throttle = 1,
    /// <summary><see cref="IVirtualMachine.LimitDirtyRate"/> caps each vCPU's page writes.</summary>
    DirtyLimit = 2,
}

/// <summary>What the migration engine needs from a VM, whatever runs it (built-in vCPUs, later QEMU).</summary>
public interface IVirtualMachine : IGuestBrakes, IDisposable
{
    string Name { get; }

    /// <summary>What runs the VM, as named in the Hello (ASCII, at most 32 bytes): the destination makes its VM with the factory of this kind. "builtin" for <see cref="BuiltInVm"/>.</summary>
    string Kind { get; }

    int VcpuCount { get; }

    /// <summary>The description the destination's factory starts a VM of this kind from, sent in the Hello (a QEMU guest's: <c>QemuVmSpec</c> as JSON); empty when the kind needs none.</summary>
    string Spec => "";

    /// <summary>What the guest runs, for the report's <c>workload</c> field (the built-in VM: its workload spec).</summary>
    string Description { get; }

    /// <summary>Which brakes <see cref="Throttle"/> and <see cref="LimitDirtyRate"/> really apply; a VM that cannot throttle says so here.</summary>
    VmBrakes Brakes { get; }
    GuestMemory Memory { get; }
    IDirtyLog DirtyLog { get; }
    VmRunState State { get; }

    /// <summary>Stops every vCPU at a barrier; when it returns no vCPU writes guest memory.</summary>
    void Pause();

    void Resume();

    /// <summary>Ends the VM for good (after a completed switch-over: it runs elsewhere now); its memory stays readable until Dispose.</summary>
    void Stop();

    /// <summary>vCPU and device state (everything but guest memory) as bytes; call while paused.</summary>
    byte[] SaveState();

    /// <summary>
    /// Free-page hint: marks in <paramref name="into"/> the pages the guest does not use now
    /// (their content does not matter to it), as a balloon driver's free-page reporting does;
    /// returns how many. A page reported free and written later is dirty again like any other.
    /// Default: the guest reports nothing.
    /// </summary>
    long ReportFreePages(PageBitmap into) => 0;

    /// <summary>About how many bytes <see cref="SaveState"/> will produce (QEMU's device state can be several MiB): the downtime estimate counts their time on the wire. 0: small or unknown.</summary>
    long StateSizeHint => 0;

    /// <summary>Checks the guest's own consistency (the built-in workloads' memory invariant) while paused or stopped; null when it holds or the VM cannot tell.</summary>
    string? CheckInvariant() => null;

    /// <summary>
    /// Why this VM cannot be moved by post-copy or hybrid, or null when it can. (A QEMU guest can:
    /// its vCPUs are QEMU's threads, whose faults on missing pages the destination catches in
    /// QEMU's own mapping, <see cref="IVmFactory.OpenRemoteFaults"/>.)
    /// </summary>
    string? PostCopyRefusal => null;

    /// <summary>
    /// Runs, while the VM still runs, the code its switch-over will run for the first time
    /// (e.g. the state-saving path into nowhere), so that it is compiled before the pause.
    /// Must not change the VM. Default: nothing to warm.
    /// </summary>
    void WarmSwitchover() { }
}
