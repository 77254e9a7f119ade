using System.Buffers.Binary;
using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>The VM is pluggable at both ends: the kind in the Hello picks the destination's factory.</summary>
public class VmSeamTests
{
    /// <summary>
    /// A VM of another kind: the built-in VM under another name (as a QEMU guest will be another
    /// implementation), whose state can carry <paramref name="padding"/> bytes of "device state"
    /// after the built-in VM's (u32 length, built-in state, padding).
    /// </summary>
    private sealed class OtherKindVm(IVirtualMachine inner, int padding = 0) : IVirtualMachine
    {
        public const string KindName = "other-kind";
        public IVirtualMachine Inner => inner;
        public string Name => inner.Name;
        public string Kind => KindName;
        public int VcpuCount => inner.VcpuCount;
        public string Description => "other:" + inner.Description;
        public VmBrakes Brakes => VmBrakes.None;
        public GuestMemory Memory => inner.Memory;
        public IDirtyLog DirtyLog => inner.DirtyLog;
        public VmRunState State => inner.State;
        public void Pause() => inner.Pause();
        public void Resume() => inner.Resume();
        public void Stop() => inner.Stop();
        public byte[] SaveState()
        {
            byte[] own = inner.SaveState();
            var state = new byte[4 + own.Length + padding];
            BinaryPrimitives.WriteInt32LittleEndian(state, own.Length);
            own.CopyTo(state, 4);
            for (int i = 0; i < padding; i++) state[4 + own.Length + i] = Pad(i);
            return state;
        }

        public static byte Pad(int i) => (byte)(i * 31 + (i >> 20) + 7);

        /// <summary>The built-in VM's part of a saved state; checks the padding.</summary>
        public static ReadOnlySpan<byte> Unpad(ReadOnlySpan<byte> state, out int padding)
        {
            int n = BinaryPrimitives.ReadInt32LittleEndian(state);
            var pad = state[(4 + n)..];
            for (int i = 0; i < pad.Length; i++)
                if (pad[i] != Pad(i)) throw new InvalidDataException($"device state byte {i} is {pad[i]}, expected {Pad(i)}");
            padding = pad.Length;
            return state.Slice(4, n);
        }
        public void Throttle(double fraction) { }
        public double ThrottleFraction => 0;
        public void LimitDirtyRate(double pagesPerSecondPerVcpu) { }
        public double DirtyRateLimit => 0;
        public long Operations => inner.Operations;
        public string? CheckInvariant() => inner.CheckInvariant();
        public void Dispose() => inner.Dispose();
    }

    /// <summary>Makes <see cref="OtherKindVm"/>s through the built-in factory, recording what it was asked.</summary>
    private sealed class OtherKindFactory : IVmFactory
    {
        public readonly List<string> Calls = [];
        public int PaddingRestored = -1;
        public string Kind => OtherKindVm.KindName;
        public VmMemory CreateMemory(IncomingVm vm) { Calls.Add($"memory {vm.Kind} {vm.MemoryBytes}"); return BuiltInVmFactory.Instance.CreateMemory(vm); }
        public ParkedThreads? PrepareThreads(IncomingVm vm) { Calls.Add($"threads {vm.Vcpus}"); return null; }
        public IVirtualMachine Restore(IncomingVm vm, GuestMemory memory, ReadOnlySpan<byte> state, ParkedThreads? threads)
        {
            Calls.Add("restore");
            var own = OtherKindVm.Unpad(state, out PaddingRestored);
            return new OtherKindVm(BuiltInVmFactory.Instance.Restore(vm, memory, own, threads));
        }
        public GuestMemory Unrestore(IVirtualMachine vm) => BuiltInVmFactory.Instance.Unrestore(((OtherKindVm)vm).Inner);
    }

    private static OtherKindVm StartOther(int padding = 0)
    {
        var vm = new OtherKindVm(BuiltInVm.Create(new VmConfig { Name = "o" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 16L << 20, Workload = "sweep:rate=20000", Fill = MemoryFill.Mixed, Seed = 3 }), padding);
        ((BuiltInVm)vm.Inner).Start();
        return vm;
    }

    [Theory]
    [InlineData(MigrationStrategy.PreCopy)]
    [InlineData(MigrationStrategy.PostCopy)]
    public void A_vm_of_another_kind_arrives_through_the_destinations_factory_for_that_kind(MigrationStrategy strategy)
    {
        var factory = new OtherKindFactory();
        var options = new DestinationOptions { VmFactories = [BuiltInVmFactory.Instance, factory], PostCopy = new() { Mode = DemandPagingMode.Portable } };
        using var vm = StartOther();
        // The listener keeps (and disposes) the VMs that arrived: it lives until the checks are done.
        using var pre = strategy == MigrationStrategy.PreCopy ? new Loopback(options) : null;
        using var post = pre is null ? new PostCopyLoopback(options) : null;
        var (source, arrived) = pre?.Migrate(vm, new MigrationOptions { PreCopy = new Policies.PreCopyOptions().PauseOnStall() }) ?? post!.Migrate(vm, PostCopyTests.PostCopy());
        Assert.Equal("completed", source.Outcome);
        Assert.True(arrived.Report.Verified);
        var other = Assert.IsType<OtherKindVm>(arrived.Vm);
        Assert.Equal(OtherKindVm.KindName, other.Kind);
        Assert.Equal(vm.Description, arrived.Report.Workload);
        Assert.Equal(vm.Description, source.Workload);
        Assert.Equal($"memory {OtherKindVm.KindName} {16L << 20}", factory.Calls[0]);
        Assert.Equal("restore", factory.Calls[^1]);
        Assert.Contains("threads 2", factory.Calls); // both models park the vCPU threads from Hello on: no switch creates them
        Assert.Equal(VmRunState.Stopped, vm.State);
        other.Pause();
        Assert.Null(other.CheckInvariant());
    }

    /// <summary>A device state far larger than one frame travels as VmState chunks and arrives byte for byte (pre-copy, post-copy).</summary>
    [Theory]
    [InlineData(MigrationStrategy.PreCopy)]
    [InlineData(MigrationStrategy.PostCopy)]
    public void A_40_MiB_vm_state_travels_in_chunks_and_arrives_intact(MigrationStrategy strategy)
    {
        const int padding = 40 << 20;
        var factory = new OtherKindFactory();
        var options = new DestinationOptions { VmFactories = [factory], PostCopy = new() { Mode = DemandPagingMode.Portable } };
        using var vm = StartOther(padding);
        using var pre = strategy == MigrationStrategy.PreCopy ? new Loopback(options) : null;
        using var post = pre is null ? new PostCopyLoopback(options) : null;
        var (source, arrived) = pre?.Migrate(vm, new MigrationOptions { PreCopy = new Policies.PreCopyOptions().PauseOnStall() }) ?? post!.Migrate(vm, PostCopyTests.PostCopy());
        Assert.Equal("completed", source.Outcome);
        Assert.True(arrived.Report.Verified);
        Assert.Equal(padding, factory.PaddingRestored);
        int chunks = (padding + 4 + 1024) / VmStateChunks.ChunkBytes + 1;
        Assert.InRange(source.Bytes!.VmState, padding, padding + chunks * (FrameFormat.HeaderSize + VmStateChunks.HeaderSize) + 4096);
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
    }

    [Fact]
    public void A_destination_without_a_factory_for_the_kind_refuses_it_by_name()
    {
        using var loop = new Loopback();
        using var vm = StartOther();
        var e = Assert.Throws<MigrationFailedException>(() => loop.Migrate(vm));
        Assert.Contains($"refused: VM kind '{OtherKindVm.KindName}' is not supported here (supported: builtin)", e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.Contains("VM kind", loop.DestinationFailure().Message);
    }
}
