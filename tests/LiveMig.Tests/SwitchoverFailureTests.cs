using System.Buffers.Binary;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Protocol;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// The switch-over under failure, one cell of docs/reliability.md per test: the link dies just
/// before the source sends a given frame, and neither a lost VM nor a VM running on both hosts
/// may result.
/// </summary>
public class SwitchoverFailureTests
{
    /// <summary>Passes writes through until the source is about to send a frame of type <paramref name="cut"/>; then the link is gone.</summary>
    private sealed class CutBeforeFrame(Stream inner, FrameType cut) : DelegatingStream(inner)
    {
        public bool Cut { get; private set; }
        public override int Read(Span<byte> buffer) => Cut ? throw new IOException("link cut (test)") : Inner.Read(buffer);
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            // FrameWriter writes one whole frame per call: the type byte is at offset 4.
            if (!Cut && buffer.Length >= FrameFormat.HeaderSize && BinaryPrimitives.ReadUInt32LittleEndian(buffer) == FrameFormat.Magic && buffer[4] == (byte)cut)
            {
                Cut = true;
                Inner.Dispose();
            }
            if (Cut) throw new IOException("link cut (test)");
            Inner.Write(buffer);
        }
        public override void Flush() { if (!Cut) Inner.Flush(); }
    }

    private static (MigrationFailedException Source, Loopback Loop, BuiltInVm Vm) CutBefore(FrameType frame)
    {
        var loop = new Loopback(new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(5) });
        var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Mixed });
        vm.Start();
        using var client = new TcpClient("127.0.0.1", loop.Port);
        using var cut = new CutBeforeFrame(client.GetStream(), frame);
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) }).Run(cut));
        Assert.True(cut.Cut);
        return (e, loop, vm);
    }

    [Theory]
    [InlineData(FrameType.Sync)]      // live phase
    [InlineData(FrameType.VmState)]   // stop-and-copy: the source is paused
    [InlineData(FrameType.Prepare)]   // last pages and VM state sent, not yet verified
    [InlineData(FrameType.Commit)]    // destination verified and holds the VM paused, ready
    public void Link_lost_before_commit_resumes_the_source_and_the_destination_discards(FrameType frame)
    {
        var (e, loop, vm) = CutBefore(frame);
        using (loop)
        using (vm)
        {
            Assert.Equal("failed", e.Report.Outcome);
            Assert.Equal(VmRunState.Running, vm.State);
            long ops = vm.Operations;
            Wait.Until(() => vm.Operations > ops);
            Assert.True(vm.Operations > ops, "the source VM does not run");
            Assert.Equal(0, vm.ThrottleFraction);
            Assert.False(vm.DirtyLog.IsTracking);
            var dest = loop.DestinationFailure();
            Assert.Equal("failed", dest.Report.Outcome);
            Assert.Empty(loop.Listener.Vms);
        }
    }

    /// <summary>A link cut right after Commit: the destination runs the VM, the source keeps its copy paused and says the outcome is unknown to it.</summary>
    private sealed class CutAfterCommit(Stream inner) : DelegatingStream(inner)
    {
        private bool _committed;
        public override int Read(Span<byte> buffer) => _committed ? throw new IOException("link cut after Commit (test)") : Inner.Read(buffer);
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            Inner.Write(buffer);
            if (buffer.Length >= FrameFormat.HeaderSize && BinaryPrimitives.ReadUInt32LittleEndian(buffer) == FrameFormat.Magic && buffer[4] == (byte)FrameType.Commit)
                _committed = true;
        }
    }

    [Fact]
    public void Link_lost_after_commit_leaves_the_vm_running_on_the_destination_only()
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Mixed });
        vm.Start();
        using var client = new TcpClient("127.0.0.1", loop.Port);
        using var cut = new CutAfterCommit(client.GetStream());
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions()).Run(cut));
        Assert.Contains("never running on both", e.Message);
        Assert.Equal(VmRunState.Paused, vm.State); // not resumed: the destination may (and here does) run it
        var (_, arrived) = (0, loop.Listener.Vms.Count == 1 ? loop.Listener.Vms.First() : WaitArrived(loop));
        Assert.Equal(VmRunState.Running, arrived.State);
    }

    private static IVirtualMachine WaitArrived(Loopback loop)
    {
        Wait.Until(() => loop.Listener.Vms.Count == 1);
        return loop.Listener.Vms.Single();
    }
}
