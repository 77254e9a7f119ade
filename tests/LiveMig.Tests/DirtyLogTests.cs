using LiveMig.DirtyTracking;
using LiveMig.Memory;

namespace LiveMig.Tests;

public class DirtyLogTests
{
    public static TheoryData<DirtyLogKind> Kinds => new() { DirtyLogKind.Software, DirtyLogKind.Kernel };

    [Theory]
    [MemberData(nameof(Kinds))]
    public unsafe void Reports_exactly_the_pages_written_under_concurrent_writers(DirtyLogKind kind)
    {
        using var mem = GuestMemory.Create(64L << 20);
        using var log = DirtyLogFactory.Create(mem, kind, out _);
        // Some pages populated before tracking starts: they must not show up as dirty.
        for (long p = 0; p < mem.PageCount; p += 7) { mem.Page(p)[1] = 9; }
        log.Start();
        var expected = new PageBitmap(mem.PageCount);
        var writers = new Thread[4];
        var perWriter = new long[writers.Length][];
        for (int w = 0; w < writers.Length; w++)
        {
            var rng = new Random(100 + w);
            perWriter[w] = Enumerable.Range(0, 3000).Select(_ => (long)rng.Next((int)mem.PageCount)).ToArray();
        }
        for (int w = 0; w < writers.Length; w++)
        {
            long[] pages = perWriter[w];
            writers[w] = new Thread(() =>
            {
                foreach (long p in pages) { *(long*)mem.PagePointer(p) = p; mem.NoteWrite(p); }
            });
        }
        foreach (var t in writers) t.Start();
        foreach (var t in writers) t.Join();
        foreach (var pages in perWriter) foreach (long p in pages) expected.SetUnsynchronized(p);

        var got = new PageBitmap(mem.PageCount);
        long n = log.Harvest(got);
        Assert.Equal(expected.Count(), n);
        Assert.Equal(expected.Words, got.Words);

        // Harvest cleared the log: a second harvest with no writes finds nothing, then exactly one new write.
        var again = new PageBitmap(mem.PageCount);
        Assert.Equal(0, log.Harvest(again));
        mem.Page(12345)[100] = 1; mem.NoteWrite(12345);
        Assert.Equal(1, log.Harvest(again));
        Assert.True(again.IsSet(12345));
        log.Stop();
    }

    [Fact]
    public void Kernel_log_sees_writes_that_bypass_the_software_write_path()
    {
        using var mem = GuestMemory.Create(16L << 20);
        using var log = DirtyLogFactory.Create(mem, DirtyLogKind.Kernel, out _);
        log.Start();
        mem.Page(3)[0] = 1; // no NoteWrite: only the kernel can see this
        mem.Page(4000)[4095] = 1;
        var got = new PageBitmap(mem.PageCount);
        Assert.Equal(2, log.Harvest(got));
        Assert.True(got.IsSet(3) && got.IsSet(4000));
    }

    [Fact]
    public void Kernel_log_harvest_of_a_large_memory_walks_both_halves_and_reports_exactly_the_writes()
    {
        // 2 GiB, sparse: large enough for the two-thread walk; the writes straddle its split.
        using var mem = GuestMemory.Create(2L << 30);
        using var log = DirtyLogFactory.Create(mem, DirtyLogKind.Kernel, out _);
        log.Start();
        long half = mem.PageCount / 2;
        long[] written = [0, 63, 64, half - 1, half, half + 1, mem.PageCount - 1];
        foreach (long p in written) mem.Page(p)[7] = 1;
        var got = new PageBitmap(mem.PageCount);
        Assert.Equal(written.Length, log.Harvest(got));
        Assert.Equal(written, got.Runs().SelectMany(r => Enumerable.Range(0, (int)r.Count).Select(i => r.First + i)));
        Assert.Equal(0, log.Harvest(new PageBitmap(mem.PageCount)));
    }

    [Fact]
    public void Kernel_log_harvest_within_ranges_reports_the_writes_inside_them()
    {
        using var mem = GuestMemory.Create(16L << 20);
        using var log = DirtyLogFactory.Create(mem, DirtyLogKind.Kernel, out _);
        log.Start();
        foreach (long p in new long[] { 5, 100, 101, 2000, 4095 }) mem.Page(p)[0] = 1;
        var got = new PageBitmap(mem.PageCount);
        long n = log.HarvestWithin([(100, 2), (1000, 1001), (4095, 1)], got);
        Assert.Equal(4, n);
        Assert.Equal([(100L, 2L), (2000L, 1L), (4095L, 1L)], got.Runs());
        // Outside the ranges nothing was asked: page 5's write is still there for the next harvest.
        var rest = new PageBitmap(mem.PageCount);
        Assert.Equal(1, log.Harvest(rest));
        Assert.True(rest.IsSet(5));
    }

    [Fact]
    public void Software_log_harvest_within_ranges_reports_at_least_the_writes_inside_them()
    {
        using var mem = GuestMemory.Create(16L << 20);
        using var log = DirtyLogFactory.Create(mem, DirtyLogKind.Software, out _);
        log.Start();
        foreach (long p in new long[] { 5, 100 }) { mem.Page(p)[0] = 1; mem.NoteWrite(p); }
        var got = new PageBitmap(mem.PageCount);
        log.HarvestWithin([(100, 1)], got);
        Assert.True(got.IsSet(100)); // a superset is allowed (the default harvests everything)
    }

    [Fact]
    public void Harvest_racing_writers_loses_no_write()
    {
        // Writers keep writing while the harvester runs; every page written must appear in some harvest.
        using var mem = GuestMemory.Create(8L << 20);
        var log = new SoftwareDirtyLog(mem);
        log.Start();
        var seen = new PageBitmap(mem.PageCount);
        var written = new PageBitmap(mem.PageCount);
        using var cts = new CancellationTokenSource();
        var writer = new Thread(() =>
        {
            var rng = new Random(7);
            for (int i = 0; i < 200_000; i++)
            {
                long p = rng.Next((int)mem.PageCount);
                written.Set(p);
                mem.NoteWrite(p);
            }
        });
        writer.Start();
        while (writer.IsAlive) log.Harvest(seen);
        log.Harvest(seen);
        Assert.Equal(written.Words, seen.Words);
    }
}
