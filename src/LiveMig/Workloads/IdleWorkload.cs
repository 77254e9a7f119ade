using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// Writes nothing: memory content comes only from the VM's initial fill. Parameter:
/// <c>used</c> (size or %, default all memory): the part of memory the guest uses; the rest it
/// reports free (free-page hint), so <c>--skip-free-pages</c> does not send it.
/// </summary>
public sealed class IdleWorkload : Workload
{
    private readonly long _usedPages;

    public IdleWorkload(WorkloadSpec spec, long memoryPages) : base(spec)
    {
        spec.CheckKnown("used");
        _usedPages = spec.Pages("used", memoryPages, memoryPages);
    }

    public override long FreePages(PageBitmap into) => FreeAbove(into, _usedPages);

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed) => new Program();

    private sealed class Program : VcpuProgram
    {
        public override int Step(GuestMemory memory) => 0;
        public override void Save(BinaryWriter w) { }
        public override void Load(BinaryReader r) { }
    }
}
