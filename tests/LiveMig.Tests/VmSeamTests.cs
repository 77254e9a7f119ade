using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>The VM is pluggable at both ends: the kind in the Hello picks the destination's factory.</summary>
public class VmSeamTests
{
    /// <summary>A VM of another kind: the built-in VM under another name (as a QEMU guest will be another implementation).</summary>
    private sealed class OtherKindVm(IVirtualMachine inner) : IVirtualMachine
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
        public byte[] SaveState() => inner.SaveState();
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
        public string Kind => OtherKindVm.KindName;
        public VmMemory CreateMemory(IncomingVm vm) { Calls.Add($"memory {vm.Kind} {vm.MemoryBytes}"); return BuiltInVmFactory.Instance.CreateMemory(vm); }
        public ParkedThreads? PrepareThreads(IncomingVm vm) { Calls.Add($"threads {vm.Vcpus}"); return null; }
        public IVirtualMachine Restore(IncomingVm vm, GuestMemory memory, ReadOnlySpan<byte> state, ParkedThreads? threads)
        {
            Calls.Add("restore");
            return new OtherKindVm(BuiltInVmFactory.Instance.Restore(vm, memory, state, threads));
        }
        public GuestMemory Unrestore(IVirtualMachine vm) => BuiltInVmFactory.Instance.Unrestore(((OtherKindVm)vm).Inner);
    }

    private static OtherKindVm StartOther()
    {
        var vm = new OtherKindVm(BuiltInVm.Create(new VmConfig { Name = "o" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 16L << 20, Workload = "sweep:rate=20000", Fill = MemoryFill.Mixed, Seed = 3 }));
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
        var (source, arrived) = pre?.Migrate(vm) ?? post!.Migrate(vm, PostCopyTests.PostCopy());
        Assert.Equal("completed", source.Outcome);
        Assert.True(arrived.Report.Verified);
        var other = Assert.IsType<OtherKindVm>(arrived.Vm);
        Assert.Equal(OtherKindVm.KindName, other.Kind);
        Assert.Equal(vm.Description, arrived.Report.Workload);
        Assert.Equal(vm.Description, source.Workload);
        Assert.Equal($"memory {OtherKindVm.KindName} {16L << 20}", factory.Calls[0]);
        Assert.Equal("restore", factory.Calls[^1]);
        Assert.Equal(strategy == MigrationStrategy.PreCopy, factory.Calls.Contains("threads 2")); // post-copy starts its vCPUs at the switch
        Assert.Equal(VmRunState.Stopped, vm.State);
        other.Pause();
        Assert.Null(other.CheckInvariant());
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
