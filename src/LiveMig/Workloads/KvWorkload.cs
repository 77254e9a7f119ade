using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>Placeholder until the key-value workload lands: refuses clearly.</summary>
public sealed class KvWorkload : Workload
{
    public KvWorkload(WorkloadSpec spec, long memoryPages) : base(spec) =>
        throw new FormatException("workload 'kv' is not available in this build yet");

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed) =>
        throw new NotSupportedException();
}
