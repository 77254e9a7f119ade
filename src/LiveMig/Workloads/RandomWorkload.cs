using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// Uniform random 8-byte writes over a range at a target rate of page writes per second.
/// Parameters: <c>rate</c> (page writes/s for the whole VM, default 20000, 0 = unlimited), <c>range</c>.
/// </summary>
public sealed class RandomWorkload : Workload
{
    private readonly long _rangePages;
    private readonly double _rate;

    public RandomWorkload(WorkloadSpec spec, long memoryPages) : base(spec)
    {
        spec.CheckKnown("rate", "range");
        _rangePages = spec.Pages("range", memoryPages, memoryPages);
        _rate = spec.Double("rate", 20000, 0, 1e12);
    }

    /// <summary>Pages outside <c>range</c> are never touched: reported free.</summary>
    public override long FreePages(PageBitmap into) => FreeAbove(into, _rangePages);

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed) =>
        new PageWriterProgram(seed, _rate / vcpuCount, (ref Xoshiro256 rng) => rng.NextBelow(_rangePages), Time);
}

/// <summary>Writes 8 random bytes into pages a chooser picks; shared by the random and hotcold workloads.</summary>
internal sealed class PageWriterProgram(ulong seed, double rate, PageWriterProgram.Chooser choose, TimeProvider time) : VcpuProgram
{
    public delegate long Chooser(ref Xoshiro256 rng);

    private Xoshiro256 _rng = new(seed);
    private RatePacer _pacer = new(rate, time);

    public override unsafe int Step(GuestMemory memory)
    {
        int n = _pacer.Take(256);
        for (int i = 0; i < n; i++)
        {
            long page = choose(ref _rng);
            ulong v = _rng.Next();
            int offset = (int)(v & (GuestMemory.PageSize / 8 - 1)) * 8;
            *(ulong*)(memory.GuestPointer(page) + offset) = v;
            memory.NoteWrite(page);
        }
        Operations += n;
        return n;
    }

    public override void Save(BinaryWriter w) { _rng.Write(w); w.Write(Operations); }
    public override void Load(BinaryReader r) { _rng = Xoshiro256.Read(r); Operations = r.ReadInt64(); }
    public override void OnResume() => _pacer.Reset();
}
