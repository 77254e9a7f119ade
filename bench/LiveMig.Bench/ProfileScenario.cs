using System.Diagnostics;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Protocol;

namespace LiveMig.Bench;

/// <summary>
/// Where LiveMig's time goes: each step of the page path timed on its own, one thread, over the
/// same amount of memory (Stopwatch sections in the benchmark; the engine is not instrumented).
/// The destination's steps are: receive (socket) → frame checksum → copy into guest memory,
/// which is fresh (first touch); the source's: zero check → copy into the frame → checksum → send.
/// At pause: dirty-log harvest, hashing for verification, and on the destination building the
/// VM's dirty log (register + write-protect of all its memory).
/// </summary>
internal static class ProfileScenario
{
    public static void Run(long memoryBytes, int reps, TextWriter output)
    {
        var steps = new Dictionary<string, List<double>>();
        void Add(string step, double seconds) { if (!steps.TryGetValue(step, out var l)) steps[step] = l = []; l.Add(seconds); }

        byte[] buffer = new byte[PlainCopy.BufferSize];
        Random.Shared.NextBytes(buffer);
        long pages = memoryBytes / GuestMemory.PageSize;
        for (int r = 0; r < reps; r++)
        {
            Add("socket: plain TCP copy over loopback (sender + receiver threads)", PlainCopy.Run(memoryBytes, false));

            using (var fresh = GuestMemory.Create(memoryBytes, "livemig-bench-fresh"))
            {
                Add("destination: copy 4 KiB pages into fresh memfd memory (first touch + copy)", Time(() => CopyInto(fresh, buffer)));
                Add("destination: copy 4 KiB pages into the same memory again (already populated)", Time(() => CopyInto(fresh, buffer)));
                Add("frame checksum: xxHash3 of 1 MiB payloads", Time(() => ChecksumAll(fresh)));
                Add("source: zero-page check (`ContainsAnyExcept(0)`) per page", Time(() => ZeroCheckAll(fresh)));
                Add("verify: `GuestMemory.ComputeHash` (parallel, all cores)", Time(() => fresh.ComputeHash()));
                Add("pause: build the VM's dirty log on populated memory (`DirtyLogFactory.Create`)", Time(() =>
                {
                    using var log = DirtyLogFactory.Create(fresh, DirtyLogKind.Auto, out _);
                }));
                using var tracking = DirtyLogFactory.Create(fresh, DirtyLogKind.Auto, out _);
                Add("source: dirty-log `Start` on populated memory (register + write-protect all)", Time(tracking.Start));
                var bitmap = new PageBitmap(pages);
                Add("pause: dirty-log `Harvest` with nothing written", Time(() => tracking.Harvest(bitmap)));
                Add("source: dirty-log `Stop` on populated memory (unregister)", Time(tracking.Stop));
                // What the destination does between Prepare and Ready (inside the downtime), verification aside.
                byte[] state;
                using (var tiny = Vm.BuiltInVm.Create(new Vm.VmConfig { Name = "profile", MemoryBytes = 1L << 20, Workload = "idle" })) state = tiny.SaveState();
                Vm.BuiltInVm? restored = null;
                Add("destination at Prepare: `BuiltInVm.Restore` on populated memory (VM threads + dirty log)", Time(() => restored = Vm.BuiltInVm.Restore(fresh, state)));
                restored!.Dispose(); // also unmaps `fresh`; its own Dispose is then a no-op
            }

            using (var fresh = GuestMemory.Create(memoryBytes, "livemig-bench-populate"))
            {
                Add("destination alternative: `MADV_POPULATE_WRITE` of fresh memfd memory (`GuestMemory.Populate`)", Time(() => fresh.Populate(0, pages)));
                Add("destination alternative: then copy 4 KiB pages into it", Time(() => CopyInto(fresh, buffer)));
            }
            ThroughputScenario.Progress($"profile rep {r + 1}/{reps} done");
        }

        output.WriteLine($"### Where the time goes: each step alone over {Units.Bytes(memoryBytes)}, one thread unless said (median of {reps})");
        output.WriteLine();
        output.WriteLine("| Step | Seconds | GB/s | µs per 4 KiB page |");
        output.WriteLine("|---|---:|---:|---:|");
        foreach (var (step, list) in steps)
        {
            double s = Stats.Median(list);
            output.WriteLine($"| {step} | {s:0.000} | {Stats.GB(memoryBytes) / s:0.00} | {s * 1e6 / pages:0.00} |");
        }
        output.WriteLine();
    }

    private static double Time(Action a)
    {
        long t0 = Stopwatch.GetTimestamp();
        a();
        return Stopwatch.GetElapsedTime(t0).TotalSeconds;
    }

    private static void CopyInto(GuestMemory memory, byte[] buffer)
    {
        int perBuffer = buffer.Length / GuestMemory.PageSize;
        for (long p = 0; p < memory.PageCount; p++)
            buffer.AsSpan((int)(p % perBuffer) * GuestMemory.PageSize, GuestMemory.PageSize).CopyTo(memory.Page(p));
    }

    private static void ChecksumAll(GuestMemory memory)
    {
        const int Frame = 1 << 20;
        ulong sink = 0;
        Span<byte> header = stackalloc byte[8];
        for (long off = 0; off < memory.Size; off += Frame)
            sink ^= FrameFormat.Checksum(header, memory.Range(off / GuestMemory.PageSize, (int)(Math.Min(Frame, memory.Size - off) / GuestMemory.PageSize)));
        GC.KeepAlive(sink);
    }

    private static void ZeroCheckAll(GuestMemory memory)
    {
        long nonZero = 0;
        for (long p = 0; p < memory.PageCount; p++)
            if (memory.Page(p).ContainsAnyExcept((byte)0)) nonZero++;
        GC.KeepAlive(nonZero);
    }
}
