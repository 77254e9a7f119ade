using System.Buffers.Binary;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// Pre-copy resume (docs/reliability.md, "Resume"): the link drops before the switch-over, the
/// VM keeps running on the source, the source reattaches to the same destination and goes on
/// from what the destination acknowledged, not from scratch; memory verifies at the end.
/// </summary>
public class ResumeTests
{
    /// <summary>Passes frames through until the <paramref name="nth"/> frame of type <paramref name="cut"/> is about to be written; then the link is gone (closed, or silently black-holed).</summary>
    internal sealed class CutAt(Stream inner, FrameType cut, int nth, bool blackHole = false) : DelegatingStream(inner)
    {
        private int _seen;
        public bool Cut { get; private set; }

        public override int Read(Span<byte> buffer)
        {
            if (Cut && !blackHole) throw new IOException("link cut (test)");
            return Inner.Read(buffer); // a black hole: nothing comes back, the read times out
        }

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            // FrameWriter writes one whole frame per call: the type byte is at offset 4.
            if (!Cut && buffer.Length >= FrameFormat.HeaderSize && BinaryPrimitives.ReadUInt32LittleEndian(buffer) == FrameFormat.Magic && buffer[4] == (byte)cut && ++_seen == nth)
            {
                Cut = true;
                if (!blackHole) Inner.Dispose();
            }
            if (Cut)
            {
                if (blackHole) return; // swallowed: the peer sees nothing and no error
                throw new IOException("link cut (test)");
            }
            Inner.Write(buffer);
        }

        public override void Flush() { if (!Cut) Inner.Flush(); }

        // A black-holed connection stays open at the destination (half-open) until the test ends.
        protected override void Dispose(bool disposing)
        {
            if (!blackHole) base.Dispose(disposing);
        }
    }

    internal static Stream Tcp(int port)
    {
        var client = new TcpClient("127.0.0.1", port) { NoDelay = true };
        return client.GetStream();
    }

    private static BuiltInVm StartSweep(ulong seed)
    {
        var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Vcpus = 2, Workload = "sweep:rate=100000", Fill = MemoryFill.Mixed, Seed = seed });
        vm.Start();
        Wait.Until(() => vm.Operations > 5_000);
        return vm;
    }

    internal static MigrationOptions Resumable(PipelineOptions? pipeline = null) => new()
    {
        ReconnectWindow = TimeSpan.FromSeconds(20),
        // Several live rounds whatever the machine's speed, so every cut point is reached.
        PreCopy = new Policies.PreCopyOptions { DowntimeLimit = TimeSpan.Zero, MaxRounds = 4 }.PauseOnStall(),
        IoTimeout = TimeSpan.FromSeconds(10),
        Pipeline = pipeline ?? new PipelineOptions(),
        PostCopy = new PostCopyOptions { FirstRetryDelay = TimeSpan.FromMilliseconds(10) },
    };

    public static TheoryData<FrameType, int, string> Cuts => new()
    {
        { FrameType.PageBatch, 3, "round 0" },      // in the middle of round 0
        { FrameType.Sync, 2, "round 1" },           // round 0 acknowledged, round 1 sent, not yet acknowledged
        { FrameType.VmState, 1, "stop-and-copy" },  // paused: the source must resume the VM while it reconnects
        { FrameType.Prepare, 1, "stop-and-copy" },  // everything sent, not yet verified
    };

    [Theory]
    [MemberData(nameof(Cuts))]
    public void Link_drop_before_the_switch_over_reattaches_and_completes_verified(FrameType frame, int nth, string phase)
    {
        using var loop = new Loopback(new DestinationOptions { VerifyFromScratch = true });
        using var vm = StartSweep(7);
        CutAt? first = null;
        var migration = new PreCopyMigration(vm, Resumable())
        {
            Connector = attempt => attempt == 0 ? first = new CutAt(Tcp(loop.Port), frame, nth) : Tcp(loop.Port),
        };
        var report = migration.MigrateTo("127.0.0.1", loop.Port);
        Assert.True(first!.Cut);

        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(1, report.Reconnects);
        Assert.Single(report.Interruptions);
        Assert.StartsWith(phase, report.Interruptions[0]);
        Assert.Equal(vm.Memory.ComputeHash().ToString("x16"), report.SourceHash);
        var arrived = loop.Listener.Vms.Count == 1 ? loop.Listener.Vms.Single() : WaitArrived(loop);
        Assert.Equal(VmRunState.Running, arrived.State);
        // Every page holds its last version: the sweep's invariant holds after running on.
        long ops = arrived.Operations;
        Wait.Until(() => arrived.Operations > ops + 5_000);
        arrived.Pause();
        Assert.Null(arrived.CheckInvariant());
    }

    [Theory]
    [InlineData(FrameType.PageBatch, 30)] // most of round 0 delivered, not yet acknowledged
    [InlineData(FrameType.Sync, 2)]       // round 0 acknowledged; round 1 sent, not yet acknowledged
    public void Resume_sends_again_only_what_did_not_arrive(FrameType frame, int nth)
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 1, Workload = "random:rate=200", Fill = MemoryFill.Random, Seed = 3 });
        vm.Start();
        long populated = vm.Memory.DataExtents().Sum(e => e.Count);
        var migration = new PreCopyMigration(vm, Resumable())
        {
            Connector = attempt => attempt == 0 ? new CutAt(Tcp(loop.Port), frame, nth) : Tcp(loop.Port),
        };
        var report = migration.MigrateTo("127.0.0.1", loop.Port);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(1, report.Reconnects);
        // Starting over would send about twice the guest; resuming sends the part that was
        // lost in flight (socket buffers), what the guest dirtied, and nothing else again.
        Assert.True(report.PagesSent < populated * 14 / 10, $"{report.PagesSent} pages sent for {populated} populated");
    }

    [Fact]
    public void Resume_with_xbzrle_dedup_and_compression_verifies()
    {
        using var loop = new Loopback(new DestinationOptions { VerifyFromScratch = true });
        using var vm = StartSweep(11);
        var pipeline = new PipelineOptions { Compression = CompressionKind.Lz4, XbzrleCacheBytes = 8L << 20, Dedup = true };
        var migration = new PreCopyMigration(vm, Resumable(pipeline))
        {
            // Cut in the middle of round 1: its deltas and references lean on pages the destination may lack.
            Connector = attempt => attempt == 0 ? new CutAt(Tcp(loop.Port), FrameType.PageBatch, 6) : Tcp(loop.Port),
        };
        var report = migration.MigrateTo("127.0.0.1", loop.Port);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(1, report.Reconnects);
    }

    [Fact]
    public void Half_open_link_is_detected_by_the_source_and_replaced_at_the_destination()
    {
        // The destination's own timeout is long: only the reattach can end its blocked read.
        using var loop = new Loopback(new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(60) });
        using var vm = StartSweep(5);
        Stream? raw = null;
        var options = Resumable() with { IoTimeout = TimeSpan.FromSeconds(1) };
        var migration = new PreCopyMigration(vm, options)
        {
            Connector = attempt => attempt == 0 ? new CutAt(raw = Tcp(loop.Port), FrameType.Sync, 1, blackHole: true) : Tcp(loop.Port),
        };
        try
        {
            var report = migration.MigrateTo("127.0.0.1", loop.Port);
            Assert.Equal("completed", report.Outcome);
            Assert.True(report.Verified);
            Assert.Equal(1, report.Reconnects);
            Assert.Single(loop.Listener.Vms.Count == 1 ? loop.Listener.Vms : [WaitArrived(loop)]);
        }
        finally
        {
            raw?.Dispose();
        }
    }

    [Fact]
    public void Destination_that_refuses_resume_makes_a_drop_fail_cleanly()
    {
        using var loop = new Loopback(new DestinationOptions { ResumeWindow = TimeSpan.Zero });
        using var vm = StartSweep(9);
        var migration = new PreCopyMigration(vm, Resumable())
        {
            Connector = attempt => attempt == 0 ? new CutAt(Tcp(loop.Port), FrameType.Sync, 1) : throw new InvalidOperationException("must not reconnect"),
        };
        var e = Assert.Throws<MigrationFailedException>(() => migration.MigrateTo("127.0.0.1", loop.Port));
        Assert.Equal(0, e.Report.Reconnects);
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.False(vm.DirtyLog.IsTracking);
        Assert.Equal("failed", loop.DestinationFailure().Report.Outcome);
        Assert.Empty(loop.Listener.Vms);
    }

    [Fact]
    public void Source_that_does_not_come_back_in_time_leaves_both_sides_clean()
    {
        using var loop = new Loopback(new DestinationOptions { ResumeWindow = TimeSpan.FromMilliseconds(300) });
        using var vm = StartSweep(13);
        var options = Resumable() with { ReconnectWindow = TimeSpan.FromMilliseconds(200) };
        var migration = new PreCopyMigration(vm, options)
        {
            Connector = attempt => attempt == 0 ? new CutAt(Tcp(loop.Port), FrameType.Sync, 1) : throw new SocketException((int)SocketError.ConnectionRefused),
        };
        var e = Assert.Throws<MigrationFailedException>(() => migration.MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("not re-established", e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
        var dest = loop.DestinationFailure();
        Assert.Contains("did not come back", dest.Message);
        Assert.Empty(loop.Listener.Vms);
    }

    [Fact]
    public void Reattaching_after_the_destination_gave_up_is_refused_with_a_clear_error()
    {
        using var loop = new Loopback(new DestinationOptions { ResumeWindow = TimeSpan.FromMilliseconds(100) });
        using var vm = StartSweep(17);
        var migration = new PreCopyMigration(vm, Resumable())
        {
            Connector = attempt =>
            {
                if (attempt == 0) return new CutAt(Tcp(loop.Port), FrameType.Sync, 1);
                loop.DestinationFailure(); // wait until the destination discarded its copy
                return Tcp(loop.Port);
            },
        };
        var e = Assert.Throws<MigrationFailedException>(() => migration.MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("cannot resume", e.Message);
        Assert.Contains("is waiting here", e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
    }

    private static IVirtualMachine WaitArrived(Loopback loop)
    {
        Wait.Until(() => loop.Listener.Vms.Count == 1);
        return loop.Listener.Vms.Single();
    }
}

public class DeliveredMessageTests
{
    [Fact]
    public void Round_trips_through_frames()
    {
        var bits = new Memory.PageBitmap(1_000_000);
        foreach (long p in new long[] { 0, 63, 64, 499_999, 999_999 }) bits.Set(p);
        var ms = new MemoryStream();
        using (var w = new FrameWriter(ms)) DeliveredMessage.Send(w, 7, bits);
        ms.Position = 0;
        using var r = new FrameReader(ms);
        var back = new Memory.PageBitmap(1_000_000);
        int frames = 0;
        while (ms.Position < ms.Length)
        {
            Assert.Equal(FrameType.Delivered, r.Read(out var payload));
            Assert.Equal(7, DeliveredMessage.Apply(payload, back));
            frames++;
        }
        Assert.Equal(3, frames); // 15,625 words in chunks of 7,680
        Assert.Equal(5, back.Count());
        Assert.True(back.IsSet(499_999));
    }

    [Theory]
    [InlineData(8, 0UL, 0u, "shorter than its header")]
    [InlineData(16, 3UL, 0u, "not a multiple of 64")]
    [InlineData(24, 0UL, 2u, "do not match")]
    [InlineData(16 + 8 * 4, 64UL * 2, 4u, "run past memory")]
    public void Hostile_chunks_are_refused_naming_the_problem(int length, ulong first, uint words, string expected)
    {
        var payload = new byte[length];
        if (length >= 16)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(payload, 1);
            BinaryPrimitives.WriteUInt64LittleEndian(payload.AsSpan(4), first);
            BinaryPrimitives.WriteUInt32LittleEndian(payload.AsSpan(12), words);
        }
        var e = Assert.Throws<ProtocolException>(() => DeliveredMessage.Apply(payload, new Memory.PageBitmap(300)));
        Assert.Contains(expected, e.Message);
    }
}
