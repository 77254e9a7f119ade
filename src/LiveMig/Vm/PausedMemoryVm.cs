using LiveMig.DirtyTracking;
using LiveMig.Memory;

namespace LiveMig.Vm;

/// <summary>
/// A VM known only by its paused memory: what a restarted source has after a post-copy switch
/// whose first source process died (<c>livemig migrate --recover</c>). Its vCPUs and device state
/// already run at the destination; this side only serves the pages the destination lacks, so it
/// never runs, never saves state, and tracks no writes (nothing writes it).
/// </summary>
public sealed class PausedMemoryVm(string name, GuestMemory memory, string kind = BuiltInVm.KindName) : IVirtualMachine
{
    public string Name { get; } = name;
    public string Kind { get; } = kind;
    public int VcpuCount => 1;
    public string Description => "recovered memory";
    public GuestMemory Memory { get; } = memory;
    public IDirtyLog DirtyLog { get; } = new NoWrites();
    public VmRunState State => VmRunState.Paused;
    public VmBrakes Brakes => VmBrakes.None;
    public void Pause() { }
    public void Resume() => throw new InvalidOperationException("a recovered VM's vCPUs run at the destination, never here");
    public byte[] SaveState() => throw new InvalidOperationException("a recovered VM has no state here: the destination holds it");
    public void Stop() { }
    public void Throttle(double fraction) { }
    public double ThrottleFraction => 0;
    public void LimitDirtyRate(double pagesPerSecondPerVcpu) { }
    public double DirtyRateLimit => 0;
    public void Dispose() => Memory.Dispose();

    /// <summary>Nothing writes paused memory: a dirty log that never reports a page.</summary>
    private sealed class NoWrites : IDirtyLog
    {
        public string Name => "none";
        public bool IsTracking { get; private set; }
        public void Start() => IsTracking = true;
        public long Harvest(PageBitmap into) => 0;
        public void Stop() => IsTracking = false;
        public void Dispose() { }
    }
}
