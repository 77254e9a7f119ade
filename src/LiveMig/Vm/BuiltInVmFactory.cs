using LiveMig.Memory;
using LiveMig.Workloads;

namespace LiveMig.Vm;

/// <summary>Makes arriving built-in VMs (<see cref="BuiltInVm"/>, kind "builtin"): memfd guest memory (or a prepared region), vCPU threads made at Hello.</summary>
public sealed class BuiltInVmFactory : IVmFactory
{
    public static readonly BuiltInVmFactory Instance = new();

    /// <summary>Most vCPU threads made ahead at Hello (a larger VM gets its threads at restore).</summary>
    private const int MaxParkedVcpus = 64;

    public string Kind => BuiltInVm.KindName;

    public VmMemory CreateMemory(IncomingVm vm)
    {
        if (vm.MemoryPool?.Take(vm.MemoryBytes) is { } prepared) return new VmMemory(prepared, Populated: true);
        // memfd names are limited to 249 bytes: a long (up to 255-byte) VM name must not fail the allocation.
        return new VmMemory(GuestMemory.Create(vm.MemoryBytes, "livemig-in-" + vm.Name[..Math.Min(vm.Name.Length, 64)]), Populated: false);
    }

    public ParkedThreads? PrepareThreads(IncomingVm vm) =>
        vm.Vcpus <= MaxParkedVcpus ? new ParkedThreads(vm.Vcpus, vm.Name[..Math.Min(vm.Name.Length, 32)]) : null;

    public IVirtualMachine Restore(IncomingVm vm, GuestMemory memory, ReadOnlySpan<byte> state, ParkedThreads? threads) =>
        BuiltInVm.Restore(memory, state, vm.DirtyLog, threads, vm.Time);

    public GuestMemory Unrestore(IVirtualMachine vm) => ((BuiltInVm)vm).DetachMemory();

    /// <summary>The VM, its vCPU programs and every workload (the destination learns which from the state), and the kv endpoint's hand-over.</summary>
    public IEnumerable<Type> SwitchoverTypes
    {
        get
        {
            yield return typeof(BuiltInVm);
            yield return typeof(VcpuProgram);
            yield return typeof(WorkloadSpec);
            foreach (var t in typeof(Workload).Assembly.GetTypes())
                if (t.IsSubclassOf(typeof(Workload)) || t == typeof(Workload)) yield return t;
            yield return typeof(KvEndpoint);
            yield return typeof(KvRequest);
        }
    }
}
