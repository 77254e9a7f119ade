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
        SpinWait.SpinUntil(() => vm.Operations > 20_000);
        var (report, arrived) = loop.Migrate(vm);

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
        SpinWait.SpinUntil(() => dest.Operations > ops + 10_000);
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

    [Fact]
    public void Non_converging_guest_stops_after_its_dirty_set_stops_shrinking()
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 64L << 20, Vcpus = 2, Workload = "sweep", Seed = 3 });
        vm.Start();
        var options = new MigrationOptions { BandwidthLimit = 64L << 20, PreCopy = new() { DowntimeLimit = TimeSpan.FromMilliseconds(1), MaxRounds = 50 } };
        var (report, arrived) = loop.Migrate(vm, options);
        Assert.True(report.Verified);
        Assert.Contains(report.StopReason, new[] { "non-convergence", "max-rounds" });
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
