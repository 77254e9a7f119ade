using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// Like QEMU's migration-test guest: bumps the first byte of every page of a range, pass after
/// pass (pass p writes p+1, mod 256). Each vCPU owns a slice; its registers are (pass, position),
/// so after migration every page's byte is exactly determined — pages before the position hold
/// pass+1, the rest pass (or, during the first pass, their initial content) — and
/// <see cref="CheckInvariant"/> checks every page.
/// Parameters: <c>range</c> (size or %, default all memory), <c>rate</c> (pages/s, 0 = as fast as it can).
/// </summary>
public sealed class SweepWorkload : Workload
{
    private readonly long _rangePages;
    private readonly double _rate;

    public SweepWorkload(WorkloadSpec spec, long memoryPages) : base(spec)
    {
        spec.CheckKnown("range", "rate");
        _rangePages = spec.Pages("range", memoryPages, memoryPages);
        _rate = spec.Double("rate", 0, 0, 1e12);
    }

    /// <summary>Pages outside <c>range</c> are never touched: reported free.</summary>
    public override long FreePages(PageBitmap into) => FreeAbove(into, _rangePages);

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed)
    {
        long per = _rangePages / vcpuCount;
        long first = per * vcpu;
        long count = vcpu == vcpuCount - 1 ? _rangePages - first : per;
        return new Program(first, Math.Max(count, 0), _rate / vcpuCount, Time);
    }

    public override string? CheckInvariant(GuestMemory memory, IReadOnlyList<VcpuProgram> programs)
    {
        foreach (Program p in programs.Cast<Program>())
        {
            long end = p.Pass == 0 ? p.Position : p.Count; // the first pass has not reached the rest yet
            for (long i = 0; i < end; i++)
            {
                byte expected = (byte)(i < p.Position ? p.Pass + 1 : p.Pass);
                byte actual = memory.GuestPage(p.First + i)[0];
                if (actual != expected)
                    return $"sweep invariant broken at page {p.First + i}: byte is {actual}, expected {expected} (pass {p.Pass}, position {p.Position})";
            }
        }
        return null;
    }

    internal sealed class Program(long first, long count, double rate, TimeProvider time) : VcpuProgram
    {
        public readonly long First = first, Count = count;
        public long Pass, Position;
        private RatePacer _pacer = new(rate, time);

        public override unsafe int Step(GuestMemory memory)
        {
            if (Count == 0) return 0;
            int n = _pacer.Take(256);
            for (int i = 0; i < n; i++)
            {
                long page = First + Position;
                memory.GuestPointer(page)[0] = (byte)(Pass + 1);
                memory.NoteWrite(page);
                if (++Position == Count) { Position = 0; Pass++; }
            }
            Operations += n;
            return n;
        }

        public override void Save(BinaryWriter w) { w.Write(Pass); w.Write(Position); w.Write(Operations); }

        public override void Load(BinaryReader r)
        {
            Pass = r.ReadInt64(); Position = r.ReadInt64(); Operations = r.ReadInt64();
            if (Position < 0 || Position >= Math.Max(Count, 1)) throw new InvalidDataException($"sweep position {Position} outside its slice of {Count} pages");
        }

        public override void OnResume() => _pacer.Reset();
    }
}
