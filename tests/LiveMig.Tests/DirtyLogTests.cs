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
