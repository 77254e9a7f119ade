using LiveMig.DirtyTracking;
using LiveMig.Memory;

namespace LiveMig.Vm;

/// <summary>
/// A VM arriving at a destination, as its Hello announced it, with the destination's settings
/// its factory may use.
/// </summary>
public sealed record IncomingVm
{
    public required Guid MigrationId { get; init; }
    public required string Name { get; init; }
    /// <summary>The VM kind from the Hello (the factory's <see cref="IVmFactory.Kind"/>).</summary>
    public required string Kind { get; init; }
    public required long MemoryBytes { get; init; }
    public required int Vcpus { get; init; }
    /// <summary>The description from the Hello that a VM of this kind is started from (QEMU: <c>QemuVmSpec</c> JSON); empty when none came. Peer text: validate it.</summary>
    public string Spec { get; init; } = "";
    /// <summary>How the VM's writes are tracked once it runs here (should it leave again).</summary>
    public DirtyLogKind DirtyLog { get; init; } = DirtyLogKind.Auto;
    /// <summary>Memory this destination prepared ahead, if any (a factory may take a region of the right size).</summary>
    public MemoryPool? MemoryPool { get; init; }
    /// <summary>The destination's clock, for the VM to run by.</summary>
    public TimeProvider Time { get; init; } = TimeProvider.System;
    /// <summary>The source asked for post-copy (post-copy, hybrid, or a pre-copy that may switch to it): a factory may set demand paging up before the switch.</summary>
    public bool MayPostCopy { get; init; }
}

/// <summary>The destination's guest memory for an arriving VM; <see cref="Populated"/>: faulted in ahead already (prefaulting would only repeat it).</summary>
public readonly record struct VmMemory(GuestMemory Memory, bool Populated);

/// <summary>
/// Makes the destination's VM of one kind (the kind travels in the Hello): its guest memory
/// when the Hello arrives, then the VM itself from that memory, once it holds every page, and
/// the state the source sent. The destination keeps one factory per kind it supports
/// (<c>DestinationOptions.VmFactories</c>); the built-in VM's is <see cref="BuiltInVmFactory"/>,
/// a QEMU guest's will map QEMU's RAM file (<see cref="GuestMemory.Open(string, long?, long)"/>) and start QEMU.
/// </summary>
public interface IVmFactory
{
    /// <summary>The VM kinds a destination runs unless told otherwise: the built-in VM.</summary>
    static IReadOnlyList<IVmFactory> Defaults => [BuiltInVmFactory.Instance];

    /// <summary>The VM kind this factory makes, as named in the Hello.</summary>
    string Kind { get; }

    /// <summary>Why this destination will not take <paramref name="vm"/> (e.g. its description names a file outside what it allows), or null. Asked at Hello, before anything is allocated; the Hello is refused with it.</summary>
    string? Refusal(IncomingVm vm) => null;

    /// <summary>
    /// Zeroed guest memory for the VM; an <see cref="IOException"/> when it cannot be had (the
    /// Hello is then refused with its message). A factory may start more here (QEMU: the
    /// destination's QEMU, waiting for its device state), released by <see cref="Restore"/> or <see cref="Discard"/>.
    /// </summary>
    VmMemory CreateMemory(IncomingVm vm);

    /// <summary>Why the VM being prepared for <paramref name="vm"/> can no longer arrive (its QEMU died), or null while it can. Asked at every round; the migration then fails with it and the source is told.</summary>
    string? ArrivalFailure(IncomingVm vm) => null;

    /// <summary>The migration of <paramref name="vm"/> failed before a VM was restored: release what <see cref="CreateMemory"/> made besides the memory (which the destination disposes itself).</summary>
    void Discard(IncomingVm vm) { }

    /// <summary>
    /// vCPU threads to start now, at Hello, so that the restore in the switch-over creates none;
    /// null when this kind does not need them (e.g. its vCPUs are another process's). Default: null.
    /// </summary>
    ParkedThreads? PrepareThreads(IncomingVm vm) => null;

    /// <summary>
    /// Post-copy: where the VM's page faults are caught when its vCPUs are another process's
    /// threads (QEMU's) — a userfaultfd that process registered over its own mapping of the guest
    /// memory, asked for before <see cref="Restore"/> (restoring may read guest memory). Null, the
    /// default: the vCPUs are this process's, and the destination registers its own mapping. A
    /// factory whose VMs need one and cannot have it throws a <see cref="VmFailedException"/>
    /// saying why (the migration then fails before the switch: the source resumes the VM).
    /// </summary>
    RemoteFaults? OpenRemoteFaults(IncomingVm vm) => null;

    /// <summary>
    /// Rebuilds the VM, paused, over <paramref name="memory"/> (which it then owns) from the
    /// state the source saved, running its vCPUs on <paramref name="threads"/> when given.
    /// Hostile state bytes get an <see cref="InvalidDataException"/> whose message says what is wrong.
    /// </summary>
    IVirtualMachine Restore(IncomingVm vm, GuestMemory memory, ReadOnlySpan<byte> state, ParkedThreads? threads);

    /// <summary>
    /// Undoes a restore the migration went back on (the VM never ran: its source came back after
    /// a dropped connection): ends the VM and hands its memory back, undisposed, to take pages again.
    /// </summary>
    GuestMemory Unrestore(IVirtualMachine vm);

    /// <summary>Types whose code the restore and the resume run, compiled ahead at Hello (see <c>SwitchoverWarmup</c>). Default: none.</summary>
    IEnumerable<Type> SwitchoverTypes => [];
}
