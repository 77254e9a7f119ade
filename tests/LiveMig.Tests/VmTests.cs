using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Tests;

public class VmTests
{
    [Theory]
    [InlineData(DirtyLogKind.Software)]
    [InlineData(DirtyLogKind.Kernel)]
    public void Pause_stops_every_write_and_resume_continues(DirtyLogKind kind)
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Vcpus = 3, Workload = "random:rate=0", DirtyLog = kind });
        vm.DirtyLog.Start();
        vm.Start();
        var dirty = new PageBitmap(vm.Memory.PageCount);
        Wait.Until(() => vm.Operations > 10_000);
        vm.Pause();
        long ops = vm.Operations;
        vm.DirtyLog.Harvest(dirty);
        ulong hash = vm.Memory.ComputeHash();
        // Paused: no vCPU writes, so the memory and the dirty log stay still.
        for (int i = 0; i < 3; i++)
        {
            Thread.Yield();
            Assert.Equal(0, vm.DirtyLog.Harvest(dirty));
        }
        Assert.Equal(ops, vm.Operations);
        Assert.Equal(hash, vm.Memory.ComputeHash());
        vm.Resume();
        Wait.Until(() => vm.Operations > ops + 1000);
        vm.Pause();
        Assert.True(vm.DirtyLog.Harvest(dirty) > 0);
    }

    /// <summary>What the engines used to downcast for is on the interface: kind, vCPUs, description, brakes, stop.</summary>
    [Fact]
    public void Built_in_vm_describes_itself_through_the_interface_and_stops_for_good()
    {
        using var built = BuiltInVm.Create(new VmConfig { MemoryBytes = 8L << 20, Vcpus = 3, Workload = "sweep:rate=1000", DirtyLog = DirtyLogKind.Software });
        IVirtualMachine vm = built;
        Assert.Equal("builtin", vm.Kind);
        Assert.Equal(3, vm.VcpuCount);
        Assert.Equal(built.Workload.Spec.ToString(), vm.Description);
        Assert.StartsWith("sweep", vm.Description);
        Assert.Equal(VmBrakes.Throttle | VmBrakes.DirtyLimit, vm.Brakes);
        built.Start();
        Assert.True(SpinWait.SpinUntil(() => built.Operations > 0, TimeSpan.FromSeconds(30)));
        vm.Stop();
        Assert.Equal(VmRunState.Stopped, vm.State);
        long ops = built.Operations;
        vm.Resume(); // a stopped VM never runs again
        Thread.Sleep(20);
        Assert.Equal(ops, built.Operations);
        Assert.Null(vm.CheckInvariant());
        _ = vm.Memory.ComputeHash(); // memory stays readable until Dispose
    }

    /// <summary>The destination makes vCPU threads ahead (at Hello); the restored VM runs on exactly those, paused until Resume.</summary>
    [Fact]
    public void Restore_runs_the_vcpus_on_threads_made_ahead_and_not_before_resume()
    {
        using var a = BuiltInVm.Create(new VmConfig { MemoryBytes = 8L << 20, Vcpus = 2, Workload = "sweep", DirtyLog = DirtyLogKind.Software });
        byte[] state = a.SaveState();
        var mem = GuestMemory.Create(a.Memory.Size);
        for (long p = 0; p < mem.PageCount; p++) a.Memory.Page(p).CopyTo(mem.Page(p));
        using var threads = new ParkedThreads(2, "ahead");
        using var b = BuiltInVm.Restore(mem, state, DirtyLogKind.Software, threads);
        Assert.Null(threads.Take(2, _ => () => { })); // handed to the VM already
        Assert.Equal(VmRunState.Paused, b.State);
        Assert.Equal(0, b.Operations);
        b.Resume();
        Assert.True(SpinWait.SpinUntil(() => b.Operations > 1000, TimeSpan.FromSeconds(30)));
        b.Pause();
        Assert.Null(b.CheckInvariant());
        // (ResumeToFirstRun may stay unknown: a thread that first runs after Resume never parked.)
        Assert.True(b.ResumeToFirstRun is null || b.ResumeToFirstRun >= TimeSpan.Zero);
    }

    [Fact]
    public void Parked_threads_of_another_count_are_not_used_and_end_when_disposed()
    {
        using var a = BuiltInVm.Create(new VmConfig { MemoryBytes = 8L << 20, Vcpus = 2, Workload = "sweep", DirtyLog = DirtyLogKind.Software });
        byte[] state = a.SaveState();
        var mem = GuestMemory.Create(a.Memory.Size);
        for (long p = 0; p < mem.PageCount; p++) a.Memory.Page(p).CopyTo(mem.Page(p));
        var threads = new ParkedThreads(3, "wrong-count");
        using var b = BuiltInVm.Restore(mem, state, DirtyLogKind.Software, threads);
        b.Resume();
        Assert.True(SpinWait.SpinUntil(() => b.Operations > 1000, TimeSpan.FromSeconds(30)));
        threads.Dispose(); // joins its three threads: they never ran the VM
        Assert.Null(threads.Take(3, _ => () => { }));
    }

    [Fact]
    public void State_round_trip_continues_sweep_exactly()
    {
        using var a = BuiltInVm.Create(new VmConfig { MemoryBytes = 8L << 20, Vcpus = 2, Workload = "sweep", DirtyLog = DirtyLogKind.Software });
        a.Start();
        Wait.Until(() => a.Operations > 5000);
        a.Pause();
        Assert.Null(a.CheckInvariant());
        byte[] state = a.SaveState();
        var mem = GuestMemory.Create(a.Memory.Size);
        for (long p = 0; p < mem.PageCount; p++) a.Memory.Page(p).CopyTo(mem.Page(p));
        using var b = BuiltInVm.Restore(mem, state, DirtyLogKind.Software);
        Assert.Equal(VmRunState.Paused, b.State);
        Assert.Null(b.CheckInvariant());
        b.Resume();
        long ops = b.Operations;
        Wait.Until(() => b.Operations > ops + 5000);
        b.Pause();
        Assert.Null(b.CheckInvariant());
        // A page changed behind the workload's back is caught by the invariant.
        b.Memory.Page(17)[0] ^= 0x55;
        Assert.NotNull(b.CheckInvariant());
    }

    [Fact]
    public void Corrupt_state_is_refused_clearly()
    {
        using var mem = GuestMemory.Create(1L << 20);
        Assert.Throws<InvalidDataException>(() => BuiltInVm.Restore(mem, [1, 2, 3]));
        using var a = BuiltInVm.Create(new VmConfig { MemoryBytes = 1L << 20, Workload = "random" });
        byte[] state = a.SaveState();
        Assert.Throws<InvalidDataException>(() => BuiltInVm.Restore(mem, state.AsSpan(0, state.Length - 3)));
        var trailing = state.Concat(new byte[] { 0 }).ToArray();
        Assert.Throws<InvalidDataException>(() => BuiltInVm.Restore(mem, trailing));
    }

    [Fact]
    public void Throttle_is_clamped_to_a_sane_range()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 8L << 20, Vcpus = 1, Workload = "random:rate=0" });
        vm.Throttle(0.9);
        Assert.Equal(0.9, vm.ThrottleFraction, 3);
        vm.Throttle(5);
        Assert.Equal(0.99, vm.ThrottleFraction, 3);
    }
}
