using System.Buffers.Binary;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// PageBatch frames checked by their pages' hashes (capability PageHashCheck) or not at all
/// under TLS (TlsUnchecked): the writer and reader agree, a corrupted frame is refused before a
/// page is placed, and the hashes the check took are the pages' verification hashes.
/// </summary>
public class FrameCheckTests
{
    private const int Pages = 8;

    /// <summary>One batch of raw, zero and random pages written under <paramref name="check"/>; the bytes on the wire.</summary>
    private static (byte[] Wire, PageHashes SourceHashes) Batch(GuestMemory memory, PageBatchCheck check)
    {
        var rng = new Random(5);
        for (int p = 0; p < Pages; p++)
            if (p % 3 != 1) rng.NextBytes(memory.Page(p));
        var wire = new MemoryStream();
        var hashes = new PageHashes(memory.PageCount);
        using (var frames = new FrameWriter(wire))
        {
            var batches = new PageBatchWriter(frames, memory) { Hashes = hashes, Check = check };
            batches.BeginRound(1);
            for (int p = 0; p < Pages; p++) batches.Add(p, skipZero: false);
            batches.Flush();
        }
        return (wire.ToArray(), hashes);
    }

    [Fact]
    public void Page_hash_frames_read_back_with_the_pages_hashes_and_place_verified_memory()
    {
        using var src = GuestMemory.Create(Pages * GuestMemory.PageSize, "fc-src");
        using var dst = GuestMemory.Create(Pages * GuestMemory.PageSize, "fc-dst");
        var (wire, sourceHashes) = Batch(src, PageBatchCheck.PageHashes);
        using var reader = new FrameReader(new MemoryStream(wire)) { PageBatchCheck = PageBatchCheck.PageHashes };
        Assert.Equal(FrameType.PageBatch, reader.Read(out var payload));
        Assert.Equal(Pages, reader.EntryHashes.Length);
        var placer = new PageBatchReader(dst) { Hashes = new PageHashes(dst.PageCount) };
        placer.Apply(payload, 0, reader.EntryHashes);
        Assert.Equal(src.ComputeHash(), dst.ComputeHash());
        Assert.Equal(dst.ComputeHash(), placer.Hashes.Combine()); // the reused hashes are those of the memory placed
        Assert.Equal(sourceHashes.Combine(), placer.Hashes.Combine());
    }

    [Fact]
    public void A_flipped_page_byte_or_a_broken_entry_fails_the_page_hash_check()
    {
        using var src = GuestMemory.Create(Pages * GuestMemory.PageSize, "fc-src2");
        var (wire, _) = Batch(src, PageBatchCheck.PageHashes);
        byte[] flipped = (byte[])wire.Clone();
        flipped[FrameFormat.HeaderSize + PageBatchWriter.BatchHeaderSize + PageBatchWriter.EntryHeaderSize + 100] ^= 0x10; // inside page 0
        var e = Assert.Throws<ProtocolException>(() => new FrameReader(new MemoryStream(flipped)) { PageBatchCheck = PageBatchCheck.PageHashes }.Read(out _));
        Assert.Contains("checksum mismatch", e.Message);
        Assert.Contains("page hashes differ", e.Message);
        byte[] cut = (byte[])wire.Clone();
        BinaryPrimitives.WriteUInt16LittleEndian(cut.AsSpan(FrameFormat.HeaderSize + PageBatchWriter.BatchHeaderSize + 6), 4000); // page 0's length
        e = Assert.Throws<ProtocolException>(() => new FrameReader(new MemoryStream(cut)) { PageBatchCheck = PageBatchCheck.PageHashes }.Read(out _));
        Assert.Contains("entries do not parse", e.Message);
        // A reader that expects the classic checksum refuses a page-hash frame, and the other way round.
        Assert.Throws<ProtocolException>(() => new FrameReader(new MemoryStream(wire)).Read(out _));
        var (classic, _) = Batch(src, PageBatchCheck.Bytes);
        Assert.Throws<ProtocolException>(() => new FrameReader(new MemoryStream(classic)) { PageBatchCheck = PageBatchCheck.PageHashes }.Read(out _));
    }

    [Fact]
    public void Unchecked_frames_carry_a_zero_checksum_and_only_page_batches_are_unchecked()
    {
        using var src = GuestMemory.Create(Pages * GuestMemory.PageSize, "fc-src3");
        var (wire, _) = Batch(src, PageBatchCheck.None);
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(wire.AsSpan(12)));
        using (var reader = new FrameReader(new MemoryStream(wire)) { PageBatchCheck = PageBatchCheck.None })
            Assert.Equal(FrameType.PageBatch, reader.Read(out _));
        // Control frames keep their checksum whatever the mode.
        var ms = new MemoryStream();
        using (var w = new FrameWriter(ms)) w.Send(FrameType.Sync, [1, 0, 0, 0]);
        byte[] sync = ms.ToArray();
        sync[^1] ^= 1;
        Assert.Throws<ProtocolException>(() => new FrameReader(new MemoryStream(sync)) { PageBatchCheck = PageBatchCheck.None }.Read(out _));
    }

    [Fact]
    public void A_plain_tcp_pre_copy_checks_pages_by_their_hashes_on_both_sides()
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Mixed });
        vm.Start();
        var (report, arrived) = loop.Migrate(vm, new MigrationOptions());
        Assert.True(report.Verified);
        Assert.Equal("page-hashes", report.FrameCheck);
        Assert.Equal("page-hashes", arrived.Report.FrameCheck);
    }
}
