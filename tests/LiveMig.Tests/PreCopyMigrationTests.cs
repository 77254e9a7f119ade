using LiveMig.Policies;
using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Vm;

namespace LiveMig.Tests;

public class PreCopyMigrationTests
{
    [Theory]
    [InlineData(DirtyLogKind.Software)]
    [InlineData(DirtyLogKind.Kernel)]
    public void Sweep_guest_keeps_writing_and_its_invariant_holds_on_the_destination(DirtyLogKind kind)
    {
        using var loop = new Loopback(new DestinationOptions { DirtyLog = kind, VerifyFromScratch = true });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = "sweep:rate=200000", Fill = MemoryFill.Mixed, Seed = 5, DirtyLog = kind });
        vm.Start();
        Wait.Until(() => vm.Operations > 20_000);
        // About the data, not the policy: a loaded machine may not converge, so accept the pause.
        var (report, arrived) = loop.Migrate(vm, new MigrationOptions { PreCopy = new PreCopyOptions().PauseOnStall() });

        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(report.SourceHash, report.DestinationHash);
        Assert.True(report.Rounds.Count >= 2);
        Assert.True(report.Rounds[^1].Final);
        Assert.True(report.DowntimeMs > 0 && report.DowntimeMs < report.TotalTimeMs);
        Assert.Equal(VmRunState.Stopped, vm.State);
        // The source stopped at pause: its memory is the reference.
        Assert.Equal(vm.Memory.ComputeHash().ToString("x16"), report.SourceHash);

        var dest = arrived.Vm;
        Assert.Equal(VmRunState.Running, dest.State);
        long ops = dest.Operations;
        Wait.Until(() => dest.Operations > ops + 10_000);
        dest.Pause();
        Assert.Null(dest.CheckInvariant());
        Assert.True(dest.Operations > ops);
    }

    [Fact]
    public void Idle_vm_migrates_with_zero_pages_as_markers_only()
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Workload = "idle", Fill = MemoryFill.Mixed, Seed = 9 });
        vm.Start();
        ulong before = vm.Memory.ComputeHash();
        var (report, arrived) = loop.Migrate(vm);
        Assert.True(report.Verified);
        Assert.Equal(before, arrived.Vm.Memory.ComputeHash());
        // Mixed fill: about a third of pages are zero and none of them carried data.
        long raw = report.PagesByEncoding["raw"], zero = report.PagesByEncoding["zero"];
        Assert.True(zero > raw / 3, $"zero {zero}, raw {raw}");
        Assert.Equal(raw * 4096, report.Bytes.PageData);
        Assert.True(report.BytesOnWire < (raw + 64) * 4096 + raw * 16);
        Assert.Equal("downtime-target", report.StopReason);
    }

    /// <summary>A guest that rewrites all its memory faster than the link carries it can never meet a 1 ms target.</summary>
    private static MigrationOptions NeverConverges(PreCopyOptions? preCopy = null) => new()
    {
        BandwidthLimit = 64L << 20,
        PreCopy = (preCopy ?? new PreCopyOptions()) with { DowntimeLimit = TimeSpan.FromMilliseconds(1), MaxRounds = 5 },
    };

    private static BuiltInVm SweepingVm() => BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Vcpus = 2, Workload = "sweep", Seed = 3 });

    [Fact]
    public void Non_converging_guest_is_not_paused_past_the_limit_by_default_the_migration_fails_and_the_vm_runs_on()
    {
        using var loop = new Loopback();
        using var vm = SweepingVm();
        vm.Start();
        var e = Assert.Throws<MigrationFailedException>(() => loop.Migrate(vm, NeverConverges()));
        Assert.Contains("pre-copy stalled", e.Message);
        Assert.Contains("over the downtime limit of 1 ms", e.Message);
        Assert.Contains("pages/s", e.Message);
        Assert.Contains("--on-stall", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.Equal(0, vm.ThrottleFraction);
        Assert.Equal(0, e.Report.DowntimeMs);
        Assert.Contains(e.Report.Escalations, l => l.Contains("aborted"));
        // Still running: its counter moves on.
        long ops = vm.Operations;
        Assert.True(SpinWait.SpinUntil(() => vm.Operations > ops, TimeSpan.FromSeconds(10)), "the VM does not run after the failed migration");
        loop.DestinationFailure();
    }

    [Fact]
    public void Non_converging_guest_with_on_stall_pause_is_paused_within_the_maximum_and_the_report_says_by_how_much()
    {
        using var loop = new Loopback();
        using var vm = SweepingVm();
        vm.Start();
        var (report, arrived) = loop.Migrate(vm, NeverConverges(new PreCopyOptions().PauseOnStall(TimeSpan.FromSeconds(30))));
        Assert.True(report.Verified);
        Assert.Contains(report.StopReason, new[] { "non-convergence", "max-rounds", "no-gain" });
        Assert.NotNull(report.DowntimeExceededMs);
        Assert.Equal(report.DowntimeMs - 1, report.DowntimeExceededMs!.Value, 3);
        Assert.Contains(report.Escalations, l => l.Contains("paused anyway"));
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
    }

    [Fact]
    public void Non_converging_guest_with_on_stall_pause_whose_estimate_exceeds_the_maximum_is_not_paused()
    {
        using var loop = new Loopback();
        using var vm = SweepingVm();
        vm.Start();
        // The estimate is hundreds of milliseconds: over a maximum of 2 ms.
        var e = Assert.Throws<MigrationFailedException>(() => loop.Migrate(vm, NeverConverges(new PreCopyOptions().PauseOnStall(TimeSpan.FromMilliseconds(2)))));
        Assert.Contains("pre-copy stalled", e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
        loop.DestinationFailure();
    }

    [Fact]
    public void Non_converging_guest_with_on_stall_throttle_is_slowed_until_it_converges_and_released()
    {
        using var loop = new Loopback();
        using var vm = SweepingVm();
        vm.Start();
        var options = NeverConverges() with
        {
            PreCopy = NeverConverges().PreCopy with
            {
                DowntimeLimit = TimeSpan.FromMilliseconds(50),
                MaxRounds = 30,
                OnStall = StallAction.Throttle,
                AutoConverge = new AutoConvergeOptions { Initial = 0.5, Increment = 0.2, TriggerRounds = 1 },
            },
        };
        var (report, arrived) = loop.Migrate(vm, options);
        Assert.True(report.Verified);
        Assert.True(report.Throttle >= 0.5, $"throttle {report.Throttle}");
        Assert.Contains(report.Escalations, l => l.Contains("vCPU throttle 50%"));
        Assert.Null(report.DowntimeExceededMs);
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
    }

    [Fact]
    public void Hotcold_guest_converges_and_verifies()
    {
        using var loop = new Loopback(new DestinationOptions { VerifyFromScratch = true });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 128L << 20, Vcpus = 2, Workload = "hotcold:rate=20000,wss=10%", Fill = MemoryFill.Mixed, Seed = 11 });
        vm.Start();
        var (report, arrived) = loop.Migrate(vm, new MigrationOptions { BandwidthLimit = 512L << 20 });
        Assert.True(report.Verified);
        Assert.Equal(arrived.Report.DestinationHash, report.SourceHash);
        Assert.True(report.Rounds.Sum(r => r.PagesSent) == report.PagesSent);
    }
}

public class KvMigrationTests
{
    [Fact]
    public async Task Kv_store_and_its_client_survive_a_live_migration()
    {
        using var endpoint = new LiveMig.Workloads.KvEndpoint();
        using var loop = new Loopback(new DestinationOptions { BeforeResume = v => endpoint.Attach(((BuiltInVm)v).Workload as LiveMig.Workloads.KvWorkload), VerifyFromScratch = true });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = "kv:keys=4096", Seed = 21 });
        endpoint.Attach((LiveMig.Workloads.KvWorkload)vm.Workload);
        vm.Start();
        using var client = new LiveMig.Workloads.KvClient(endpoint.EndPoint, new LiveMig.Workloads.KvClientOptions { Keys = 2048, Seed = 4 });
        client.Start();
        await client.WaitForCompletedAsync(2000);
        var (report, arrived) = loop.Migrate(vm);
        long atSwitch = client.Completed;
        await client.WaitForCompletedAsync(atSwitch + 2000);
        var stats = await client.StopAsync();

        Assert.True(report.Verified);
        Assert.Null(stats.Failure);
        Assert.Equal(0, stats.Errors);
        Assert.Equal(0, stats.Mismatches); // every GET after the move returned what was PUT before it
        Assert.True(stats.LongestGapUs > 0);
        Assert.Same(((BuiltInVm)arrived.Vm).Workload, endpoint.Target);
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
    }
}

public class PreparedMemoryTests
{
    [Fact]
    public void A_vm_lands_in_memory_the_agent_prepared_and_verifies()
    {
        using var pool = new LiveMig.Memory.MemoryPool(32L << 20, 1);
        pool.WaitReady();
        using var loop = new Loopback(new DestinationOptions { MemoryPool = pool, VerifyFromScratch = true });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Mixed, Seed = 3 });
        vm.Start();
        var (report, arrived) = loop.Migrate(vm);
        Assert.True(report.Verified);
        // The region was taken from the pool (it was populated in full before the migration).
        Assert.Null(pool.Take(32L << 20));
        Assert.Equal(arrived.Vm.Memory.PageCount, arrived.Vm.Memory.PopulatedPages());
    }
}
