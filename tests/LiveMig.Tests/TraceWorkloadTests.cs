using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Traces;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Tests;

public class TraceWorkloadTests
{
    /// <summary>A made-up trace: an initial image of every class, then intervals writing seeded pages, some partly.</summary>
    internal static byte[] Synthetic(int pages, int intervals, int perInterval, int seed, int intervalMs = 100)
    {
        var rng = new Random(seed);
        var ms = new MemoryStream();
        using var w = new TraceWriter(ms, new TraceHeader { Source = "synthetic", NominalInterval = TimeSpan.FromMilliseconds(intervalMs) });
        PageContent Pick(int page) => page % 17 == 5 && page > 0 ? PageContent.Duplicate : (PageContent)(page % 6);
        var all = Enumerable.Range(0, pages).ToArray();
        w.Write(new TraceInterval
        {
            Index = 0, Start = TimeSpan.Zero, Duration = TimeSpan.Zero, PageSpace = pages, Pages = all,
            Content = all.Select(Pick).ToArray(), DuplicateOf = all.Select(p => Pick(p) == PageContent.Duplicate ? p - 1 : -1).ToArray(),
            BytesChanged = all.Select(_ => (ushort)4096).ToArray(),
        });
        for (int k = 1; k <= intervals; k++)
        {
            var set = Enumerable.Range(0, perInterval).Select(_ => rng.Next(pages)).Distinct().Order().ToArray();
            w.Write(new TraceInterval
            {
                Index = k, Start = TimeSpan.FromMilliseconds((k - 1) * intervalMs), Duration = TimeSpan.FromMilliseconds(intervalMs), PageSpace = pages, Pages = set,
                Content = set.Select(Pick).ToArray(), DuplicateOf = set.Select(p => Pick(p) == PageContent.Duplicate ? p - 1 : -1).ToArray(),
                BytesChanged = set.Select(p => (ushort)(p % 3 == 0 ? 4096 : 1 + p % 64)).ToArray(),
            });
        }
        w.Seal(TraceEndReason.Completed);
        return ms.ToArray();
    }

    private static string WriteTemp(byte[] trace)
    {
        string path = Path.Combine(Path.GetTempPath(), $"lmtrace-{Guid.NewGuid():N}.lmtrace");
        File.WriteAllBytes(path, trace);
        return path;
    }

    private static bool WaitFor(Func<bool> condition) => SpinWait.SpinUntil(condition, TimeSpan.FromSeconds(20));

    /// <summary>A running VM replaying <paramref name="path"/>, its initial image written.</summary>
    private static BuiltInVm Replaying(string path, long memoryBytes, int imagePages)
    {
        var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = memoryBytes, Vcpus = 2, Workload = $"trace:{path}", DirtyLog = DirtyLogKind.Software });
        vm.Start();
        Assert.True(WaitFor(() => vm.Operations >= imagePages), "initial image not written");
        return vm;
    }

    [Theory]
    [InlineData(PageContent.VeryCompressible)]
    [InlineData(PageContent.Compressible)]
    [InlineData(PageContent.SomewhatCompressible)]
    [InlineData(PageContent.BarelyCompressible)]
    [InlineData(PageContent.Incompressible)]
    public void Synthesised_content_compresses_as_its_class_and_changes_as_many_bytes_as_asked(PageContent c)
    {
        var rng = new Xoshiro256(14);
        var page = new byte[4096];
        TraceContent.Fill(page, c, ref rng);
        Assert.Equal(c, PageClassifier.Classify(page));
        foreach (int n in new[] { 1, 8, 100 })
        {
            var before = (byte[])page.Clone();
            TraceContent.Change(page, c, n, ref rng);
            Assert.Equal(n, PageClassifier.BytesChanged(before, page));
            Assert.Equal(c, PageClassifier.Classify(page));
        }
    }

    [Fact]
    public void Spec_takes_the_file_without_its_name()
    {
        var s = WorkloadSpec.Parse("trace:/tmp/a.lmtrace,speed=2");
        Assert.Equal("/tmp/a.lmtrace", s.Parameters["file"]);
        Assert.Equal("2", s.Parameters["speed"]);
        Assert.Equal("trace:file=/tmp/a.lmtrace,speed=2", s.ToString());
        Assert.Equal("/tmp/a.lmtrace", WorkloadSpec.Parse(s.ToString()).Parameters["file"]);
    }

    [Fact]
    public void Refuses_a_trace_larger_than_memory_or_damaged_clearly()
    {
        string path = WriteTemp(Synthetic(pages: 4096, intervals: 2, perInterval: 10, seed: 1));
        try
        {
            var e = Assert.Throws<FormatException>(() => Workload.Create(WorkloadSpec.Parse("trace:" + path), 2048));
            Assert.Contains("uses 4,096 pages", e.Message);
            File.WriteAllBytes(path, File.ReadAllBytes(path)[..100]);
            e = Assert.Throws<FormatException>(() => Workload.Create(WorkloadSpec.Parse("trace:" + path), 8192));
            Assert.StartsWith("trace: ", e.Message);
            e = Assert.Throws<FormatException>(() => Workload.Create(WorkloadSpec.Parse("trace:/nonexistent/x.lmtrace"), 8192));
            Assert.Contains("cannot read trace", e.Message);
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void Replay_writes_no_faster_than_recorded()
    {
        // 10 intervals of 100 ms, ~200 writes each: at speed 1 at most the due writes happen.
        string path = WriteTemp(Synthetic(pages: 1024, intervals: 10, perInterval: 200, seed: 2));
        try
        {
            using var vm = Replaying(path, 8L << 20, 1024);
            var since = System.Diagnostics.Stopwatch.StartNew();
            long start = vm.Operations;
            Thread.Sleep(300);
            vm.Pause();
            double elapsedS = since.Elapsed.TotalSeconds;
            long written = vm.Operations - start;
            // Due by then: ~2000 writes a second, plus a burst of slack for each vCPU and the interval under way.
            Assert.InRange(written, 1, (long)(elapsedS * 2000) + 2 * 256 + 200);
            Assert.Null(vm.CheckInvariant());
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void Throttling_stretches_the_replay_instead_of_being_caught_up()
    {
        // ~4000 writes a second are due; at 90% throttle a vCPU runs a tenth of the time and its clock with it.
        string path = WriteTemp(Synthetic(pages: 4096, intervals: 50, perInterval: 420, seed: 5));
        try
        {
            using var vm = Replaying(path, 16L << 20, 4096);
            vm.Throttle(0.9);
            long start = vm.Operations;
            Thread.Sleep(1000);
            long throttled = vm.Operations - start;
            vm.Throttle(0);
            Thread.Sleep(300); // no catching up on the time it was held back: the rate goes back to the recorded one
            long after = vm.Operations - start - throttled;
            vm.Pause();
            Assert.InRange(throttled, 1, 2000);
            Assert.InRange(after, 1, 0.3 * 4000 + 2 * 256 + 420);
            Assert.Null(vm.CheckInvariant());
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void Restored_vm_continues_the_replay_from_its_state_without_the_file()
    {
        string path = WriteTemp(Synthetic(pages: 1024, intervals: 5, perInterval: 300, seed: 3, intervalMs: 20));
        using var a = BuiltInVm.Create(new VmConfig { MemoryBytes = 8L << 20, Vcpus = 2, Workload = $"trace:{path},speed=2", DirtyLog = DirtyLogKind.Software });
        a.Start();
        Assert.True(WaitFor(() => a.Operations > 2500), "replay did not progress");
        a.Pause();
        File.Delete(path); // the destination has no file: the trace travels in the state
        Assert.Null(a.CheckInvariant());
        byte[] state = a.SaveState();
        var mem = GuestMemory.Create(a.Memory.Size);
        for (long p = 0; p < mem.PageCount; p++) a.Memory.Page(p).CopyTo(mem.Page(p));
        using var b = BuiltInVm.Restore(mem, state, DirtyLogKind.Software);
        Assert.Null(b.CheckInvariant());
        Assert.Equal(a.Operations, b.Operations);
        b.Resume();
        long ops = b.Operations;
        Assert.True(WaitFor(() => b.Operations > ops + 500), "restored replay did not continue");
        b.Pause();
        Assert.Null(b.CheckInvariant());
        // Bytes changed behind the replay's back are caught (one of the last pages vCPU 0 wrote).
        var recent = Enumerable.Range(0, 1024).First(p => { b.Memory.Page(p)[100] ^= 0x5A; bool caught = b.CheckInvariant() is not null; b.Memory.Page(p)[100] ^= 0x5A; return caught; });
        Assert.InRange(recent, 0, 1023);
    }

    [Fact]
    public void Migrated_replay_carries_on_at_the_destination_and_its_invariant_holds()
    {
        string path = WriteTemp(Synthetic(pages: 4096, intervals: 20, perInterval: 400, seed: 4, intervalMs: 50));
        using var loop = new Loopback(new DestinationOptions { DirtyLog = DirtyLogKind.Software, VerifyFromScratch = true });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = $"trace:{path}", DirtyLog = DirtyLogKind.Software });
        vm.Start();
        Assert.True(WaitFor(() => vm.Operations > 6000), "replay did not progress");
        File.Delete(path);
        var (report, arrived) = loop.Migrate(vm);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        var dest = arrived.Vm;
        long ops = dest.Operations;
        Assert.True(WaitFor(() => dest.Operations > ops + 1000), "replay did not continue on the destination");
        dest.Pause();
        Assert.Null(dest.CheckInvariant());
    }
}
