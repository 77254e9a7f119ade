using LiveMig.Policies;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Reporting;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// End-to-end migrations over loopback TCP with each pipeline stage: the destination rehashes
/// its memory from scratch before resuming (VerifyFromScratch), verification must pass, and the
/// counters must show that the stage did its work.
/// </summary>
public class PipelineMigrationTests(ITestOutputHelper output)
{
    private static readonly DestinationOptions Checked = new() { VerifyFromScratch = true };

    private static BuiltInVm StartVm(string workload, long memory = 32L << 20, ulong seed = 5, MemoryFill fill = MemoryFill.Mixed, string? name = null)
    {
        var vm = BuiltInVm.Create(new VmConfig { Name = name ?? "p" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = memory, Vcpus = 2, Workload = workload, Fill = fill, Seed = seed });
        vm.Start();
        return vm;
    }

    private void Show(MigrationReport r)
    {
        output.WriteLine($"{r.Role}: pipeline {r.Pipeline}, {r.BytesOnWire} bytes on the wire, pages {string.Join(' ', r.PagesByEncoding.Select(kv => $"{kv.Key}={kv.Value}"))}");
        foreach (var (name, s) in r.Stages)
            output.WriteLine($"  {name}: {s.PagesEncoded}/{s.PagesOffered} pages, saved {s.BytesSaved}, {s.CpuMs:0.0} ms, {string.Join(' ', s.Counters.Select(kv => $"{kv.Key}={kv.Value}"))}");
    }

    private static void AssertVerified(MigrationReport source, ArrivedVm arrived)
    {
        Assert.Equal("completed", source.Outcome);
        Assert.True(source.Verified);
        Assert.Equal(source.SourceHash, arrived.Report.DestinationHash);
    }

    /// <summary>
    /// These tests check the stages, not convergence: on a loaded machine the link (or a slow codec)
    /// may carry less than the guest writes, and the migration then pauses anyway instead of failing.
    /// </summary>
    private static readonly PreCopyOptions AnyLoad = new PreCopyOptions().PauseOnStall();

    [Theory]
    [InlineData(CompressionKind.Lz4, null)]
    [InlineData(CompressionKind.Zstd, 3)]
    [InlineData(CompressionKind.Adaptive, null)]
    public void Pipeline_compression_migrates_verifies_and_saves_bytes(CompressionKind kind, int? level)
    {
        using var loop = new Loopback(Checked);
        using var vm = StartVm("random:rate=5000");
        // A capped link, so that the adaptive stage finds compression worth its CPU. For adaptive the
        // cap is low enough (0.25 ms a raw page) that compression wins by 10x even on busy cores,
        // where its measured codec speed drops: the decision must not depend on the machine's load.
        long cap = kind == CompressionKind.Adaptive ? 16L << 20 : 64L << 20;
        var options = new MigrationOptions { PreCopy = AnyLoad, BandwidthLimit = cap, Pipeline = new PipelineOptions { Compression = kind, CompressionLevel = level } };
        var (report, arrived) = loop.Migrate(vm, options);
        Show(report);
        Show(arrived.Report);
        AssertVerified(report, arrived);

        long compressed = report.PagesByEncoding["lz4"] + report.PagesByEncoding["zstd"];
        long raw = report.PagesByEncoding["raw"];
        Assert.True(compressed > 0, "no page was compressed");
        // Mixed fill: 40% text pages (compressible), 25% random (not).
        Assert.True(compressed > raw, $"compressed {compressed}, raw {raw}");
        if (kind == CompressionKind.Lz4) Assert.Equal(0, report.PagesByEncoding["zstd"]);
        if (kind == CompressionKind.Zstd) Assert.Equal(0, report.PagesByEncoding["lz4"]);
        string stage = kind == CompressionKind.Adaptive ? "adaptive" : kind.ToString().ToLowerInvariant();
        Assert.True(report.Stages[stage].BytesSaved > 0);
        Assert.True(report.Stages[stage].CpuMs > 0);
        if (kind == CompressionKind.Adaptive) Assert.True(report.Stages["adaptive"].Counters["incompressible"] > 0);
        // Page data on the wire is well under the raw size of the pages sent.
        Assert.True(report.Bytes.PageData < report.PagesSent * (long)GuestMemory.PageSize * 3 / 4, $"{report.Bytes.PageData} bytes of page data for {report.PagesSent} pages");
        // The destination decoded the same pages.
        Assert.Equal(report.PagesByEncoding["lz4"], arrived.Report.PagesByEncoding["lz4"]);
        Assert.Equal(report.PagesByEncoding["zstd"], arrived.Report.PagesByEncoding["zstd"]);
        Assert.Equal($"{(kind is CompressionKind.Lz4 or CompressionKind.Adaptive ? "lz4" : "")}{(kind == CompressionKind.Adaptive ? " " : "")}{(kind is CompressionKind.Zstd or CompressionKind.Adaptive ? "zstd" : "")}", arrived.Report.Pipeline);
    }

    [Fact]
    public void Pipeline_adaptive_decides_for_every_page_it_is_offered_and_the_migration_verifies()
    {
        // Which way it decides depends on how fast this machine compresses against how fast the
        // link drains, so that is checked on made-up timings (CodecTests' adaptive policy cases,
        // "cpu-bound" included); here: it is in the path, accounts for its pages, and loses none.
        using var loop = new Loopback(Checked);
        using var vm = StartVm("idle");
        var options = new MigrationOptions { PreCopy = AnyLoad, Pipeline = new PipelineOptions { Compression = CompressionKind.Adaptive } };
        var (report, arrived) = loop.Migrate(vm, options);
        Show(report);
        AssertVerified(report, arrived);
        Assert.Equal(vm.Memory.ComputeHash(), arrived.Vm.Memory.ComputeHash());
        var adaptive = report.Stages["adaptive"];
        var a = adaptive.Counters;
        Assert.True(adaptive.PagesOffered > 0, "the adaptive stage was never offered a page");
        Assert.Equal(adaptive.PagesOffered, a["raw"] + a["lz4"] + a["zstd"]);
        Assert.Equal(a["raw"], a["incompressible"] + a["cpuBound"]); // every raw page says why
    }

    [Fact]
    public void Pipeline_xbzrle_sends_re_dirtied_pages_as_deltas()
    {
        using var loop = new Loopback(Checked);
        // Sweep bumps one byte per page, pass after pass: the ideal case for deltas.
        using var vm = StartVm("sweep:rate=40000,range=25%");
        var options = new MigrationOptions
        {
            BandwidthLimit = 128L << 20,
            PreCopy = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(1), MaxRounds = 5 }.PauseOnStall(),
            Pipeline = new PipelineOptions { XbzrleCacheBytes = 16L << 20 },
        };
        var (report, arrived) = loop.Migrate(vm, options);
        Show(report);
        AssertVerified(report, arrived);
        var x = report.Stages["xbzrle"];
        Assert.True(report.Rounds.Count >= 3, $"{report.Rounds.Count} rounds");
        Assert.True(x.Counters["cacheHits"] > 0, "no cache hit");
        Assert.True(x.Counters["cacheMisses"] > 0);
        Assert.Equal(x.Counters["cacheHits"], report.PagesByEncoding["xbzrle"]);
        Assert.True(x.BytesSaved > x.PagesEncoded * 4000L, $"saved {x.BytesSaved} on {x.PagesEncoded} pages");
        Assert.Equal(report.PagesByEncoding["xbzrle"], arrived.Report.PagesByEncoding["xbzrle"]);
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
    }

    [Fact]
    public void Pipeline_dedup_sends_duplicate_pages_as_references()
    {
        using var loop = new Loopback(Checked);
        using var vm = BuiltInVm.Create(new VmConfig { Name = "dd" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 32L << 20, Workload = "random:rate=2000,range=10%", Fill = MemoryFill.Mixed, Seed = 8 });
        // 2000 pages that are copies of 40 others (shared libraries, page cache).
        for (int i = 0; i < 2000; i++) Pages.Text(i % 40).CopyTo(vm.Memory.Page(4000 + i));
        vm.Start();
        var (report, arrived) = loop.Migrate(vm, new MigrationOptions { PreCopy = AnyLoad, Pipeline = new PipelineOptions { Dedup = true } });
        Show(report);
        AssertVerified(report, arrived);
        var d = report.Stages["dedup"];
        Assert.True(report.PagesByEncoding["dedup"] >= 1960, $"dedup {report.PagesByEncoding["dedup"]}");
        Assert.True(d.Counters["withinVm"] >= 1960);
        Assert.Equal(d.PagesEncoded * (GuestMemory.PageSize - PipelineEncoder.DedupPayloadSize), d.BytesSaved);
        Assert.Equal(report.PagesByEncoding["dedup"], arrived.Report.PagesByEncoding["dedup"]);
        for (int i = 0; i < 2000; i += 97) Assert.True(arrived.Vm.Memory.Page(4000 + i).SequenceEqual(Pages.Text(i % 40)));
    }

    /// <summary>Gang migration: a second VM with the same content sends almost nothing; the destination fills it from the first.</summary>
    [Fact]
    public void Pipeline_dedup_across_vms_sent_to_the_same_destination()
    {
        using var loop = new Loopback(Checked);
        var options = new MigrationOptions { PreCopy = AnyLoad, Pipeline = new PipelineOptions { Dedup = true } };
        using var a = StartVm("idle", seed: 21, name: "gangA" + Guid.NewGuid().ToString("N")[..6]);
        var (ra, arrivedA) = loop.Migrate(a, options);
        Show(ra);
        AssertVerified(ra, arrivedA);
        Assert.Equal(0, ra.Stages["dedup"].Counters["gangFilled"]);

        using var b = StartVm("idle", seed: 21, name: "gangB" + Guid.NewGuid().ToString("N")[..6]);
        var (rb, arrivedB) = loop.Migrate(b, options);
        Show(rb);
        Show(arrivedB.Report);
        AssertVerified(rb, arrivedB);
        long nonZero = ra.PagesByEncoding["raw"];
        Assert.Equal(nonZero, rb.Stages["dedup"].Counters["gangQueried"]);
        Assert.Equal(nonZero, rb.Stages["dedup"].Counters["gangFilled"]);
        Assert.Equal(nonZero, rb.PagesByEncoding["dedup"]);
        Assert.Equal(0, rb.PagesByEncoding["raw"]);
        Assert.Equal(nonZero, arrivedB.Report.Stages["dedup"].Counters["gangFilled"]);
        // The query costs 20 bytes a page instead of 4 KiB.
        Assert.True(rb.BytesOnWire < ra.BytesOnWire / 50, $"B sent {rb.BytesOnWire} bytes, A {ra.BytesOnWire}");
        Assert.Equal(arrivedA.Vm.Memory.ComputeHash(), arrivedB.Vm.Memory.ComputeHash());
    }

    [Fact]
    public void Pipeline_free_pages_are_skipped_and_arrive_zero()
    {
        using var loop = new Loopback(Checked);
        using var vm = StartVm("random:rate=5000,range=25%");
        long populated = vm.Memory.PopulatedPages();
        var (report, arrived) = loop.Migrate(vm, new MigrationOptions { PreCopy = AnyLoad, Pipeline = new PipelineOptions { SkipFreePages = true } });
        Show(report);
        Assert.True(report.Verified);
        Assert.Equal(report.SourceHash, arrived.Report.DestinationHash);
        long skipped = report.PagesByEncoding["skipped"];
        // About 3/4 of the populated pages lie above the range.
        Assert.InRange(skipped, populated * 6 / 10, populated * 9 / 10);
        Assert.Equal(skipped, report.Stages["free-pages"].PagesEncoded);
        Assert.Equal(skipped * GuestMemory.PageSize, report.Stages["free-pages"].BytesSaved);
        // The destination holds zero above the range; the source's fill is still there (the guest said it did not care).
        long range = vm.Memory.PageCount / 4;
        foreach (var (first, count) in arrived.Vm.Memory.DataExtents()) Assert.True(first + count <= range, $"destination has data at {first}+{count}");
        Assert.NotEqual(vm.Memory.ComputeHash().ToString("x16"), report.SourceHash);
    }

    /// <summary>A page reported free, then written during the migration, is dirty again and must arrive.</summary>
    [Fact]
    public void Pipeline_free_page_written_after_the_hint_is_sent()
    {
        using var loop = new Loopback(Checked);
        using var vm = StartVm("idle:used=50%");
        long page = vm.Memory.PageCount - 3;
        byte[] content = Pages.Text(77);
        var writer = new WriteOnRoundStart(0, () => { content.CopyTo(vm.Memory.Page(page)); vm.Memory.NoteWrite(page); });
        var options = new MigrationOptions { Pipeline = new PipelineOptions { SkipFreePages = true }, PreCopy = new PreCopyOptions { MaxRounds = 3 }.PauseOnStall() };
        var (report, arrived) = loop.Migrate(vm, options, writer);
        Show(report);
        Assert.True(writer.Done);
        AssertVerified(report, arrived);
        Assert.True(report.PagesByEncoding["skipped"] > 0);
        Assert.True(arrived.Vm.Memory.Page(page).SequenceEqual(content), "the page written after the hint did not arrive");
    }

    private sealed class WriteOnRoundStart(int round, Action write) : IMigrationObserver
    {
        public bool Done { get; private set; }

        public void RoundStarted(int r, long pagesToSend, bool final)
        {
            if (r != round || Done) return;
            write();
            Done = true;
        }
    }

    /// <summary>Every stage at once (<c>--optimize all</c>) on a guest that keeps writing; its invariant holds on the destination.</summary>
    [Fact]
    public void Pipeline_all_stages_together()
    {
        using var loop = new Loopback(Checked);
        using var vm = StartVm("sweep:rate=40000,range=50%", memory: 48L << 20);
        for (int i = 0; i < 500; i++) Pages.Text(i % 10).CopyTo(vm.Memory.Page(vm.Memory.PageCount - 1 - i)); // above the range: free, skipped
        var options = new MigrationOptions
        {
            BandwidthLimit = 128L << 20,
            PreCopy = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(1), MaxRounds = 5 }.PauseOnStall(),
            Pipeline = PipelineOptions.All,
        };
        var (report, arrived) = loop.Migrate(vm, options);
        Show(report);
        Show(arrived.Report);
        AssertVerified(report, arrived);
        Assert.Equal("compress=adaptive xbzrle=64.0 MiB dedup skip-free-pages", report.Pipeline);
        Assert.True(report.PagesByEncoding["skipped"] > 0);
        Assert.True(report.PagesByEncoding["xbzrle"] > 0);
        Assert.True(report.PagesByEncoding["lz4"] + report.PagesByEncoding["zstd"] > 0);
        Assert.Equal(new[] { "adaptive", "dedup", "free-pages", "lz4", "xbzrle", "zstd" }, report.Stages.Keys.Order());
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
        // The report's JSON carries the new fields.
        var json = MigrationReport.FromJson(report.ToJson());
        Assert.Equal(report.Stages["xbzrle"].Counters["cacheHits"], json.Stages["xbzrle"].Counters["cacheHits"]);
        Assert.Equal(report.PagesByEncoding["skipped"], json.PagesByEncoding["skipped"]);
    }
}
