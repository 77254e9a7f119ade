using LiveMig.Policies;
using System.Buffers.Binary;
using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Transport;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// Several data streams (pre-copy, like QEMU's multifd): a guest that keeps writing through
/// several rounds arrives with every page at its last version, whatever the interleaving of
/// the streams; a delayed stream holds the round back, never the result; a broken stream fails
/// the migration like a broken control connection.
/// </summary>
public class StreamsTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Guard = TimeSpan.FromSeconds(20);

    /// <summary>Counts the source pages whose content differs from the destination's, just before the destination resumes.</summary>
    private sealed class PageComparer(GuestMemory source)
    {
        public long Differing = -1;
        public ulong DestinationHash;

        public void Check(IVirtualMachine arrived)
        {
            long n = 0;
            for (long p = 0; p < source.PageCount; p++)
                if (!source.Page(p).SequenceEqual(arrived.Memory.Page(p))) n++;
            DestinationHash = arrived.Memory.ComputeHash();
            Differing = n;
        }
    }

    [Theory]
    [InlineData(2, "sweep:rate=200000", DirtyLogKind.Kernel, false)]
    [InlineData(4, "random:rate=100000", DirtyLogKind.Software, false)]
    [InlineData(3, "sweep:rate=200000", DirtyLogKind.Software, false)]
    [InlineData(2, "hotcold:rate=100000", DirtyLogKind.Software, true)] // hot pages deferred, re-written pages skipped (put back pending by the stream threads)
    public void Guest_writing_through_several_rounds_arrives_with_every_page_at_its_last_version(int streams, string workload, DirtyLogKind log, bool aids)
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = workload, Fill = MemoryFill.Mixed, Seed = 11, DirtyLog = log });
        var compare = new PageComparer(vm.Memory);
        using var loop = new Loopback(new DestinationOptions { DirtyLog = log, VerifyFromScratch = true, BeforeResume = compare.Check });
        vm.Start();
        Wait.Until(() => vm.Operations > 20_000);
        // A cap and a tight downtime target: several live rounds while the guest writes.
        var options = new MigrationOptions
        {
            Streams = streams, BandwidthLimit = 256L << 20,
            PreCopy = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(5), MaxRounds = 6, DeferHotPages = aids, SkipRewrittenPages = aids }.PauseOnStall(),
        };
        var (report, arrived) = loop.Migrate(vm, options);
        output.WriteLine($"{report.Rounds.Count} rounds, {report.PagesSent} pages, stop {report.StopReason}, skipped {report.PagesSkipped}");
        if (aids) Assert.True(report.PagesSkipped > 0, "no page was skipped as re-written");

        Assert.Equal("completed", report.Outcome);
        Assert.Equal(streams, report.Streams);
        Assert.Equal(streams, arrived.Report.Streams);
        Assert.True(report.Rounds.Count >= 3, $"only {report.Rounds.Count} rounds");
        Assert.True(report.Rounds.Skip(1).Any(r => r.PagesSent > 0), "no page was re-sent: the guest did not write during the migration");
        Assert.True(report.Verified);
        Assert.Equal(report.SourceHash, report.DestinationHash);
        // The source stopped at the pause: its memory is the reference, page by page.
        Assert.Equal(0, compare.Differing);
        Assert.Equal(vm.Memory.ComputeHash(), compare.DestinationHash);
        Assert.Equal(report.PagesSent, arrived.Report.PagesSent);
        arrived.Vm.Pause();
        if (workload.StartsWith("sweep")) Assert.Null(arrived.Vm.CheckInvariant());
    }

    /// <summary>
    /// Holds a data stream's first PageBatch of <paramref name="round"/> until <paramref name="gate"/>
    /// opens (each frame is one Write: FrameWriter writes header and payload together).
    /// </summary>
    private sealed class RoundGate(Stream inner, int round, ManualResetEventSlim gate) : DelegatingStream(inner)
    {
        public bool Held { get; private set; }

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (!Held && buffer.Length >= FrameFormat.HeaderSize + 4 && BinaryPrimitives.ReadUInt32LittleEndian(buffer) == FrameFormat.Magic
                && buffer[4] == (byte)FrameType.PageBatch && BinaryPrimitives.ReadInt32LittleEndian(buffer[FrameFormat.HeaderSize..]) == round)
            {
                Held = true;
                if (!gate.Wait(Guard)) throw new IOException("test gate never opened");
            }
            Inner.Write(buffer);
        }
    }

    [Fact]
    public void A_delayed_stream_holds_the_round_back_but_not_the_others_and_every_page_arrives_at_its_last_version()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = "random:rate=100000", Fill = MemoryFill.Random, Seed = 12, DirtyLog = DirtyLogKind.Software });
        var compare = new PageComparer(vm.Memory);
        var events = new ConcurrentQueue<(int Stream, int Round)>();
        using var gate = new ManualResetEventSlim();
        const int Held = 1;
        var options = new DestinationOptions
        {
            DirtyLog = DirtyLogKind.Software, BeforeResume = compare.Check,
            StreamRoundPlaced = (stream, round) =>
            {
                events.Enqueue((stream, round));
                if (stream == 0 && round == Held) gate.Set(); // stream 0 has placed all of round 1: let stream 1 send its round 1
            },
        };
        using var loop = new Loopback(options);
        vm.Start();
        Wait.Until(() => vm.Operations > 20_000);
        RoundGate? held = null;
        var migration = new MigrationOptions
        {
            Streams = 2, PreCopy = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(1), MaxRounds = 4 }.PauseOnStall(),
            StreamConnector = i =>
            {
                var c = new TcpClient { NoDelay = true };
                c.Connect(IPAddress.Loopback, loop.Port);
                Stream s = new NetworkStream(c.Client, ownsSocket: true);
                return i == 1 ? held = new RoundGate(s, Held, gate) : s;
            },
        };
        var (report, arrived) = loop.Migrate(vm, migration);

        Assert.True(held!.Held, "stream 1 never sent a page in round 1");
        var order = events.ToList();
        output.WriteLine(string.Join(" ", order.Select(e => $"{e.Stream}:{e.Round}")));
        // Stream 0 finished round 1 while stream 1 had not sent a page of it; the round completed only after both.
        Assert.True(order.IndexOf((0, Held)) < order.IndexOf((1, Held)));
        Assert.True(report.Rounds.Count > Held + 1);
        Assert.True(report.Verified);
        Assert.Equal(0, compare.Differing);
        Assert.Equal(vm.Memory.ComputeHash(), compare.DestinationHash);
        _ = arrived;
    }

    [Fact]
    public void Several_streams_with_every_pipeline_stage_and_tls()
    {
        byte[] key = new byte[32];
        new Random(3).NextBytes(key);
        var psk = ChannelSecurity.FromPreSharedKey(key);
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = "hotcold:rate=50000", Fill = MemoryFill.Mixed, Seed = 13, DirtyLog = DirtyLogKind.Software });
        var compare = new PageComparer(vm.Memory);
        using var loop = new Loopback(new DestinationOptions { Security = psk, DirtyLog = DirtyLogKind.Software, BeforeResume = compare.Check });
        vm.Start();
        Wait.Until(() => vm.Operations > 20_000);
        var options = new MigrationOptions
        {
            Streams = 3, Security = psk, BandwidthLimit = 200L << 20,
            PreCopy = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(5), MaxRounds = 5 }.PauseOnStall(),
            Pipeline = new PipelineOptions { Compression = CompressionKind.Lz4, XbzrleCacheBytes = 16L << 20, Dedup = true }, // (free-page skipping would leave pages zero on purpose)
        };
        var (report, arrived) = loop.Migrate(vm, options);
        Assert.Equal("tls13-psk", report.Security);
        Assert.Equal(3, report.Streams);
        Assert.True(report.Verified);
        Assert.Equal(0, compare.Differing);
        Assert.True(report.PagesByEncoding["lz4"] > 0);
        Assert.True(report.PagesByEncoding["xbzrle"] > 0, "no XBZRLE delta was sent");
        // Pages sent = pages placed, whatever stream carried them.
        Assert.Equal(report.PagesSent, arrived.Report.PagesSent);
    }

    [Fact]
    public void The_bandwidth_cap_holds_for_all_streams_together()
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Workload = "idle", Fill = MemoryFill.Random, Seed = 4 });
        vm.Start();
        const long Cap = 48L << 20;
        var (report, _) = loop.Migrate(vm, new MigrationOptions { Streams = 4, BandwidthLimit = Cap });
        var r0 = report.Rounds[0];
        output.WriteLine($"round 0: {r0.BytesSent} bytes in {r0.DurationMs:0} ms = {r0.BandwidthBytesPerSecond / (1 << 20):0.0} MiB/s");
        Assert.True(r0.BytesSent > 32L << 20);
        // The bucket may start full (at most 10 ms of the rate, at least 256 KiB): nothing more.
        Assert.True(r0.BytesSent - Math.Max(256 << 10, Cap / 100) <= Cap * r0.DurationMs / 1000 * 1.02, $"{r0.BandwidthBytesPerSecond / (1 << 20):0.0} MiB/s over a cap of {Cap >> 20} MiB/s");
    }

    // ---- failures --------------------------------------------------------------------------

    private static MigrationOptions Cut(int port, int stream, FaultPlan plan, List<FaultInjectingStream> made) => new()
    {
        Streams = 2, IoTimeout = TimeSpan.FromSeconds(5),
        StreamConnector = i =>
        {
            var c = new TcpClient { NoDelay = true };
            c.Connect(IPAddress.Loopback, port);
            Stream s = new NetworkStream(c.Client, ownsSocket: true);
            if (i != stream) return s;
            var f = new FaultInjectingStream(s, plan);
            made.Add(f);
            return f;
        },
    };

    [Theory]
    [InlineData("drop")]
    [InlineData("truncate")]
    public void A_data_stream_cut_mid_round_fails_the_migration_and_the_vm_keeps_running_at_the_source(string mode)
    {
        using var loop = new Loopback(new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(5) });
        using var vm = BuiltInVm.Create(new VmConfig { Name = "cut" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 32L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Random, Seed = 7 });
        vm.Start();
        var made = new List<FaultInjectingStream>();
        var plan = mode == "drop" ? new FaultPlan { DropAfter = 3L << 20 } : new FaultPlan { TruncateAfter = 3L << 20 };
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, Cut(loop.Port, 1, plan, made)).MigrateTo("127.0.0.1", loop.Port));
        output.WriteLine($"source: {e.Message}");
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(10), $"failing took {sw.Elapsed}");
        Assert.True(made.Single().Triggered);
        Assert.Equal("failed", e.Report.Outcome);
        Assert.DoesNotContain("\n", e.Message);
        Assert.Contains("data stream 1", e.Message);
        Assert.Equal(2, e.Report.Streams);
        // The source VM runs on, unthrottled; the destination discarded its copy.
        long ops = vm.Operations;
        Assert.True(SpinWait.SpinUntil(() => vm.Operations > ops + 100, Guard), "the source VM is not running");
        var failure = loop.DestinationFailure();
        output.WriteLine($"destination: {failure.Message}");
        Assert.Equal("failed", failure.Report.Outcome);
        Assert.Empty(loop.Listener.Vms);
        Assert.DoesNotContain(File.ReadLines("/proc/self/maps"), l => l.Contains("memfd:livemig-in-" + vm.Name, StringComparison.Ordinal));
    }

    [Fact]
    public void A_byte_corrupted_on_a_data_stream_fails_the_migration_with_the_destinations_checksum_error()
    {
        using var loop = new Loopback(new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(5) });
        using var vm = BuiltInVm.Create(new VmConfig { Name = "bad" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 32L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Random, Seed = 8 });
        vm.Start();
        var made = new List<FaultInjectingStream>();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, Cut(loop.Port, 0, new FaultPlan { CorruptAt = (2L << 20) + 77 }, made)).MigrateTo("127.0.0.1", loop.Port));
        output.WriteLine($"source: {e.Message}");
        Assert.True(made.Single().Triggered);
        var failure = loop.DestinationFailure();
        output.WriteLine($"destination: {failure.Message}");
        Assert.Contains("data stream 0", failure.Message);
        Assert.Contains("checksum mismatch in PageBatch frame", failure.Message);
        // The source was told why on the control connection.
        Assert.Contains("checksum mismatch", e.Message);
        long ops = vm.Operations;
        Assert.True(SpinWait.SpinUntil(() => vm.Operations > ops + 100, Guard), "the source VM is not running");
        Assert.Empty(loop.Listener.Vms);
    }

    private sealed class CancelAt(CancellationTokenSource cts, long pages) : IMigrationObserver
    {
        public void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire)
        {
            if (round == 0 && pagesSentInRound >= pages) cts.Cancel();
        }
    }

    [Fact]
    public void Cancelling_mid_round_stops_every_stream_and_the_vm_keeps_running()
    {
        using var loop = new Loopback(new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(5) });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Random, Seed = 9 });
        vm.Start();
        using var cts = new CancellationTokenSource();
        var options = new MigrationOptions { Streams = 4, BandwidthLimit = 32L << 20, IoTimeout = TimeSpan.FromSeconds(5) };
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, options, new CancelAt(cts, 1000)).MigrateTo("127.0.0.1", loop.Port, cts.Token));
        Assert.Equal("migration cancelled", e.Message);
        long ops = vm.Operations;
        Assert.True(SpinWait.SpinUntil(() => vm.Operations > ops + 100, Guard), "the source VM is not running");
        Assert.Contains("cancelled", loop.DestinationFailure().Message);
    }

    [Fact]
    public void A_destination_without_the_capability_refuses_several_streams_by_name()
    {
        using var loop = new Loopback(new DestinationOptions { Disabled = Capabilities.MultiStream });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "idle", Seed = 1 });
        vm.Start();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { Streams = 2 }).MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("MultiStream", e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(17)]
    public void The_source_refuses_a_stream_count_out_of_range(int streams)
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "idle", Seed = 1 });
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => new PreCopyMigration(vm, new MigrationOptions { Streams = streams }));
        Assert.Contains("between 1 and 16", e.Message);
    }

    [Fact]
    public void Post_copy_refuses_several_streams_clearly()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "idle", Seed = 1 });
        var e = Assert.Throws<ArgumentException>(() => Migrations.MigrateTo(vm, new MigrationOptions { Strategy = MigrationStrategy.PostCopy, Streams = 2 }, null, "127.0.0.1", 1));
        Assert.Contains("pre-copy only", e.Message);
    }
}
