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

    // The brakes' arithmetic is checked exactly in VcpuPacerTests; these check that the VM's vCPU
    // threads obey it. Every bound below holds whatever the machine's load: a busy machine only
    // makes a vCPU slower, so upper bounds stay true, and the lower bounds compare a free vCPU with
    // one braked far below anything a starved thread still reaches.

    [Fact]
    public void Dirty_limit_caps_each_vcpus_page_writes_and_lifts_again()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Vcpus = 2, Workload = "random:rate=0", DirtyLog = DirtyLogKind.Software });
        vm.Start();
        const double limit = 50; // pages/s per vCPU
        vm.LimitDirtyRate(limit);
        Assert.Equal(limit, vm.DirtyRateLimit);
        Wait.Until(() => vm.Operations > 0, "the limited VM runs");
        long t = Stopwatch.GetTimestamp(), ops = vm.Operations;
        Thread.Sleep(1000); // a measuring window, not synchronisation
        double seconds = Stopwatch.GetElapsedTime(t).TotalSeconds;
        long capped = vm.Operations - ops;
        // Per vCPU: the limit for the window, plus one step's writes (up to 256) before it can check, plus the burst credit.
        double bound = 2 * (limit * seconds + 256 + 1);
        vm.LimitDirtyRate(0);
        Assert.Equal(0, vm.DirtyRateLimit);
        long lifted = vm.Operations;
        Wait.Until(() => vm.Operations - lifted > 10 * bound, "the VM writes freely once the limit is lifted");
        vm.Pause();

        output.WriteLine($"limited to 2 × {limit:N0}/s: {capped:N0} writes in {seconds:0.00} s (bound {bound:N0})");
        Assert.True(capped <= bound, $"{capped:N0} writes in {seconds:0.00} s under a limit of {2 * limit:N0}/s for the VM (bound {bound:N0})");
    }

    [Fact]
    public void Throttle_slows_a_cpu_bound_guest_and_a_pause_does_not_wait_for_its_sleep()
    {
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Vcpus = 2, Workload = "random:rate=0", DirtyLog = DirtyLogKind.Software });
        vm.Start();
        double free = Rate(vm, 500);
        // At 99% a vCPU runs one 10 ms timeslice per second: in half a second at most two of them,
        // 4% of the free rate at the most; 50% leaves room for a free window slowed by load.
        vm.Throttle(0.99);
        Assert.Equal(0.99, vm.ThrottleFraction);
        double throttled = Rate(vm, 500);
        output.WriteLine($"unthrottled {free:N0}/s, at 99% {throttled:N0}/s");
        Assert.True(throttled < 0.5 * free, $"throttled {throttled:N0}/s vs unthrottled {free:N0}/s");

        // A vCPU asleep for 990 ms must be woken by the pause rather than waited for.
        long t = Stopwatch.GetTimestamp();
        vm.Pause();
        var pause = Stopwatch.GetElapsedTime(t);
        Assert.True(pause < TimeSpan.FromMilliseconds(900), $"pause took {pause.TotalMilliseconds:0} ms");
        vm.Throttle(0);
        vm.Resume();
        long resumed = vm.Operations;
        Wait.Until(() => vm.Operations > resumed, "the VM runs again after the throttle is released");
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
