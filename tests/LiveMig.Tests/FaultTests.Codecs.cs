using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// Bad codec input from a real source: a PageBatch entry is rewritten in flight (and the frame's
/// checksum re-sealed, so only the codec layer can notice). The destination must fail with a
/// one-line message naming the problem, keep no partial VM, and the source must fail clearly
/// with its VM running.
/// </summary>
public partial class FaultTests
{
    [Fact]
    public void Fault_destination_lacking_a_codec_refuses_and_names_it()
    {
        using var loop = new Loopback(new DestinationOptions { Disabled = Capabilities.Zstd });
        using var vm = RunningVm();
        var options = new MigrationOptions { Pipeline = new PipelineOptions { Compression = CompressionKind.Zstd } };
        var e = RunFails(() => new PreCopyMigration(vm, options).MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("destination refused: destination lacks required capabilities: Zstd", e.Message);
        AssertUnharmed(vm);
        Assert.Contains("lacks required capabilities: Zstd", loop.DestinationFailure().Message);
        Assert.Empty(loop.Listener.Vms);
    }

    [Fact]
    public void Fault_corrupt_compressed_page_fails_the_migration_clearly()
    {
        var e = CodecFault(new MigrationOptions { Pipeline = new PipelineOptions { Compression = CompressionKind.Lz4 } }, null,
            (enc, page, payload) =>
            {
                if (enc != PageEncoding.Lz4) return null;
                payload.Fill(0xFF); // a literal run longer than the payload
                return page;
            }, out long tampered);
        Assert.Contains($"LZ4 page {tampered}: corrupt payload of", e.Message);
    }

    [Fact]
    public void Fault_dedup_reference_to_unknown_content_fails_the_migration_clearly()
    {
        var e = CodecFault(new MigrationOptions { Pipeline = new PipelineOptions { Dedup = true } },
            vm => { for (int i = 0; i < 50; i++) Pages.Text(1).CopyTo(vm.Memory.Page(6000 + i)); },
            (enc, page, payload) =>
            {
                if (enc != PageEncoding.Dedup) return null;
                payload[10] ^= 0x40; // another hash: content the destination does not hold
                return page;
            }, out long tampered);
        Assert.Contains($"dedup reference for page {tampered}: this destination does not hold content", e.Message);
        Assert.Contains("(its content differs)", e.Message);
    }

    [Fact]
    public void Fault_xbzrle_delta_against_a_page_never_received_fails_the_migration_clearly()
    {
        long hole = -1;
        var options = new MigrationOptions
        {
            PreCopy = new Policies.PreCopyOptions { DowntimeLimit = TimeSpan.FromTicks(1), MaxRounds = 4 }.PauseOnStall(),
            Pipeline = new PipelineOptions { XbzrleCacheBytes = 4L << 20 },
        };
        var e = CodecFault(options,
            vm =>
            {
                // A page the source never sends: a hole outside the workload's range.
                foreach (var (first, count) in vm.Memory.DataExtents())
                    if (first > 1000) { hole = first - 1; break; }
                Assert.True(hole > 1000);
            },
            (enc, page, payload) => enc == PageEncoding.Xbzrle ? hole : null,
            out long tampered, workload: "random:rate=20000,range=2%", renumber: true);
        Assert.Equal(hole, tampered);
        Assert.Contains($"XBZRLE delta for page {hole}, which this destination never received (no base to apply it to)", e.Message);
    }

    /// <summary>
    /// Migrates a VM through a stream that lets <paramref name="tamper"/> rewrite the first entry
    /// it chooses (returning the page to report, or null to pass). With <paramref name="renumber"/>
    /// the returned number replaces the entry's page number. Returns the source's failure.
    /// </summary>
    private MigrationFailedException CodecFault(MigrationOptions options, Action<BuiltInVm>? prepare, Func<PageEncoding, long, Span<byte>, long?> tamper,
        out long tamperedPage, string workload = "random:rate=5000,range=10%", bool renumber = false)
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { Name = NewName(), MemoryBytes = 32L << 20, Workload = workload, Fill = MemoryFill.Mixed, Seed = 7 });
        prepare?.Invoke(vm);
        vm.Start();
        using var client = new TcpClient { NoDelay = true };
        client.Connect(IPAddress.Loopback, loop.Port);
        using var stream = new EntryTamperingStream(client.GetStream(), tamper, renumber);
        var e = RunFails(() => new PreCopyMigration(vm, options with { IoTimeout = TimeSpan.FromSeconds(5) }).Run(stream));
        Assert.True(stream.TamperedPage >= 0, "no entry of the expected encoding was sent");
        tamperedPage = stream.TamperedPage;

        var failure = loop.DestinationFailure();
        AssertFailureReport(failure, "destination");
        Assert.Contains(failure.Message, e.Message); // the source says what the destination said
        AssertUnharmed(vm);
        Assert.Empty(loop.Listener.Vms);
        AssertNoIncomingMemory(vm.Name);
        return e;
    }

    /// <summary>Rewrites one PageBatch entry, once, and re-seals the frame's checksum (one frame per Write, as FrameWriter does).</summary>
    private sealed class EntryTamperingStream(Stream inner, Func<PageEncoding, long, Span<byte>, long?> tamper, bool renumber) : LiveMig.Transport.DelegatingStream(inner)
    {
        public long TamperedPage { get; private set; } = -1;


        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (TamperedPage >= 0 || buffer.Length < FrameFormat.HeaderSize || BinaryPrimitives.ReadUInt32LittleEndian(buffer) != FrameFormat.Magic || buffer[4] != (byte)FrameType.PageBatch)
            {
                Inner.Write(buffer);
                return;
            }
            byte[] frame = buffer.ToArray();
            var payload = frame.AsSpan(FrameFormat.HeaderSize);
            uint count = BinaryPrimitives.ReadUInt32LittleEndian(payload[4..]);
            int at = PageBatchWriter.BatchHeaderSize;
            for (uint i = 0; i < count && TamperedPage < 0; i++)
            {
                uint page = BinaryPrimitives.ReadUInt32LittleEndian(payload[at..]);
                var enc = (PageEncoding)payload[at + 4];
                int length = BinaryPrimitives.ReadUInt16LittleEndian(payload[(at + 6)..]);
                if (tamper(enc, page, payload.Slice(at + PageBatchWriter.EntryHeaderSize, length)) is long reported)
                {
                    TamperedPage = reported;
                    if (renumber) BinaryPrimitives.WriteUInt32LittleEndian(payload[at..], (uint)reported);
                }
                at += PageBatchWriter.EntryHeaderSize + length;
            }
            if (TamperedPage >= 0)
                BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(12), FrameFormat.PageHashChecksum(payload)!.Value); // a pre-copy source checks its pages by their hashes (capability PageHashCheck)
            Inner.Write(frame);
        }
    }
}
