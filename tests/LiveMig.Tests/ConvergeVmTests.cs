using System.Diagnostics;
using LiveMig.DirtyTracking;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>The VM's side of convergence: CPU throttle and dirty-rate limit, measured with the VM's own counters.</summary>
public class ConvergeVmTests(ITestOutputHelper output)
{
    /// <summary>Operations per second over <paramref name="ms"/> of wall time.</summary>
    private static double Rate(BuiltInVm vm, int ms)
    {
        long ops = vm.Operations, t = Stopwatch.GetTimestamp();
        Thread.Sleep(ms);
        return (vm.Operations - ops) / Stopwatch.GetElapsedTime(t).TotalSeconds;
    }

    [Fact]
    public void Dirty_limit_caps_each_vcpus_page_writes_and_lifts_again()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Vcpus = 2, Workload = "random:rate=0", DirtyLog = DirtyLogKind.Software });
        vm.Start();
        const double limit = 2000; // pages/s per vCPU
        double free = Rate(vm, 300);
        vm.LimitDirtyRate(limit);
        Assert.Equal(limit, vm.DirtyRateLimit);
        Thread.Sleep(50); // let debts from before the limit settle
        double capped = Rate(vm, 1000);
        vm.LimitDirtyRate(0);
        Assert.Equal(0, vm.DirtyRateLimit);
        double after = Rate(vm, 300);
        vm.Pause();

        output.WriteLine($"unlimited {free:N0}/s, limited to 2 × {limit:N0} {capped:N0}/s, lifted {after:N0}/s");
        // 2 vCPUs × 2000 pages/s; each Step may write up to 256 pages before the loop can check, so allow 2×.
        Assert.True(capped <= 2 * 2 * limit, $"capped rate {capped:N0}/s, limit {2 * limit:N0}/s for the VM");
        Assert.True(capped >= 0.1 * 2 * limit, $"capped rate {capped:N0}/s: the VM hardly ran");
        Assert.True(free > 4 * 2 * limit, $"unlimited rate {free:N0}/s is too low for this test to mean anything");
        Assert.True(after > 2 * 2 * limit, $"rate after lifting the limit {after:N0}/s");
    }

    [Fact]
    public void Throttle_slows_a_cpu_bound_guest_and_a_pause_does_not_wait_for_its_sleep()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Vcpus = 2, Workload = "random:rate=0", DirtyLog = DirtyLogKind.Software });
        vm.Start();
        double free = Rate(vm, 500);
        vm.Throttle(0.9);
        Thread.Sleep(20);
        double throttled = Rate(vm, 500);
        output.WriteLine($"unthrottled {free:N0}/s, at 90% {throttled:N0}/s");
        Assert.True(throttled < 0.5 * free, $"throttled {throttled:N0}/s vs unthrottled {free:N0}/s");

        // At 99% a vCPU sleeps 990 ms per 10 ms timeslice; pausing must wake it rather than wait.
        vm.Throttle(0.99);
        Thread.Sleep(50);
        long t = Stopwatch.GetTimestamp();
        vm.Pause();
        Assert.True(Stopwatch.GetElapsedTime(t) < TimeSpan.FromMilliseconds(400), $"pause took {Stopwatch.GetElapsedTime(t).TotalMilliseconds:0} ms");
        vm.Throttle(0);
        vm.Resume();
        Assert.True(Rate(vm, 300) > 0.25 * free);
    }

    [Fact]
    public void Restored_vm_starts_without_throttle_or_dirty_limit()
    {
        using var a = BuiltInVm.Create(new VmConfig { MemoryBytes = 4L << 20, Vcpus = 1, Workload = "sweep", DirtyLog = DirtyLogKind.Software });
        a.Throttle(0.5);
        a.LimitDirtyRate(100);
        byte[] state = a.SaveState();
        var mem = LiveMig.Memory.GuestMemory.Create(a.Memory.Size);
        using var b = BuiltInVm.Restore(mem, state, DirtyLogKind.Software);
        Assert.Equal(0, b.ThrottleFraction);
        Assert.Equal(0, b.DirtyRateLimit);
    }
}
