using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>Writes nothing: memory content comes only from the VM's initial fill.</summary>
public sealed class IdleWorkload : Workload
{
    public IdleWorkload(WorkloadSpec spec) : base(spec) => spec.CheckKnown();

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed) => new Program();

    private sealed class Program : VcpuProgram
    {
        public override int Step(GuestMemory memory) => 0;
        public override void Save(BinaryWriter w) { }
        public override void Load(BinaryReader r) { }
    }
}
