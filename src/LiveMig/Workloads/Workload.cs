using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// What a VM runs. A workload makes one <see cref="VcpuProgram"/> per vCPU; all guest state
/// lives either in guest memory or in the programs' registers (<see cref="VcpuProgram.Save"/>),
/// so a migrated VM continues exactly where it stopped.
/// </summary>
public abstract class Workload
{
    protected Workload(WorkloadSpec spec) => Spec = spec;

    public WorkloadSpec Spec { get; }
    public string Name => Spec.Name;

    public abstract VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed);

    /// <summary>Checks a memory invariant the workload guarantees (e.g. sweep's); null when it holds or there is none.</summary>
    public virtual string? CheckInvariant(GuestMemory memory, IReadOnlyList<VcpuProgram> programs) => null;

    /// <summary>
    /// Free-page hint: marks the pages this workload never reads or writes (their content does
    /// not matter to the guest) and returns how many. Default: none.
    /// </summary>
    public virtual long FreePages(PageBitmap into) => 0;

    /// <summary>Marks pages [<paramref name="used"/>, end of memory) free: for workloads that use a prefix of memory.</summary>
    protected static long FreeAbove(PageBitmap into, long used)
    {
        long free = into.PageCount - used;
        if (free <= 0) return 0;
        into.SetRange(used, free);
        return free;
    }

    /// <summary>Bytes the workload needs besides its spec (e.g. a replayed trace), carried in the VM state; null for none.</summary>
    public virtual byte[]? StateBlob => null;

    public static readonly string[] Names = ["idle", "sweep", "random", "hotcold", "kv", "trace"];

    /// <summary>Makes a workload; <paramref name="blob"/> is its <see cref="StateBlob"/> when rebuilt from a VM state.</summary>
    /// <summary>The clock the workload paces itself by (the VM's); the system clock unless the VM was given another.</summary>
    public TimeProvider Time { get; private set; } = TimeProvider.System;

    public static Workload Create(WorkloadSpec spec, long memoryPages, byte[]? blob = null, TimeProvider? time = null)
    {
        var w = Make(spec, memoryPages, blob);
        w.Time = time ?? TimeProvider.System;
        return w;
    }

    private static Workload Make(WorkloadSpec spec, long memoryPages, byte[]? blob) => spec.Name switch
    {
        "idle" => new IdleWorkload(spec, memoryPages),
        "sweep" => new SweepWorkload(spec, memoryPages),
        "random" => new RandomWorkload(spec, memoryPages),
        "hotcold" => new HotColdWorkload(spec, memoryPages),
        "kv" => new KvWorkload(spec, memoryPages),
        "trace" => new TraceWorkload(spec, memoryPages, blob),
        _ => throw new FormatException($"unknown workload '{spec.Name}' (known: {string.Join(", ", Names)})"),
    };
}

/// <summary>One vCPU's program: <see cref="Step"/> does a short burst of work (microseconds, so a pause is quick).</summary>
public abstract class VcpuProgram
{
    /// <summary>Work done so far (page writes or requests): lost progress under throttling shows here.</summary>
    public long Operations;

    /// <summary>Runs one burst; returns the operations done, 0 when idle (the vCPU then naps briefly).</summary>
    public abstract int Step(GuestMemory memory);

    /// <summary>Serialises the program's registers.</summary>
    public abstract void Save(BinaryWriter w);

    public abstract void Load(BinaryReader r);

    /// <summary>Called on resume so rate-limited programs do not try to catch up on the time they were paused.</summary>
    public virtual void OnResume() { }
}

/// <summary>Spreads a target rate over time without catching up after a pause: the budget grows with elapsed time, capped at 10 ms worth.</summary>
public struct RatePacer
{
    private readonly TimeProvider _time;
    private readonly double _perTick;
    private long _last;
    private double _budget;

    public RatePacer(double perSecond, TimeProvider? time = null)
    {
        _time = time ?? TimeProvider.System;
        _perTick = perSecond / _time.TimestampFrequency;
        _last = _time.GetTimestamp();
        _budget = 0;
    }

    public readonly bool Unlimited => _perTick <= 0;

    /// <summary>How many operations may run now (at most <paramref name="max"/>).</summary>
    public int Take(int max)
    {
        if (_perTick <= 0) return max;
        long now = _time.GetTimestamp();
        _budget = Math.Min(_budget + (now - _last) * _perTick, Math.Max(1, _perTick * _time.TimestampFrequency / 100));
        _last = now;
        int n = (int)Math.Min(max, Math.Floor(_budget));
        _budget -= n;
        return n;
    }

    public void Reset() { _last = _time.GetTimestamp(); _budget = 0; }
}
