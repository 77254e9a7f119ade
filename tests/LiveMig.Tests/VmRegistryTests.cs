using LiveMig.Engine;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>An agent's VMs by unique name, their management and onward migration (issue 10, item 4), in process over real TCP.</summary>
public class VmRegistryTests
{
    private static BuiltInVm WritingVm(string name, long memory = 32L << 20) =>
        BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = memory, Vcpus = 2, Workload = "sweep:rate=5000", Fill = MemoryFill.Mixed, Seed = 7 });

    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);

    /// <summary>Waits (bounded) until the VM has run further: it is alive where it is.</summary>
    private static void AssertRuns(IVirtualMachine vm, string where)
    {
        long ops = ((BuiltInVm)vm).Operations;
        Assert.True(SpinWait.SpinUntil(() => ((BuiltInVm)vm).Operations > ops, Bound), $"the VM does not run {where}");
    }

    [Fact]
    public void A_name_the_destination_already_runs_is_refused_at_hello_in_one_line_and_another_name_arrives()
    {
        using var loop = new Loopback();
        using var first = WritingVm("web1");
        first.Start();
        loop.Migrate(first);
        using var twin = WritingVm("web1");
        twin.Start();
        var e = Assert.Throws<MigrationFailedException>(() => loop.Migrate(twin));
        Assert.Contains("a VM named 'web1' already runs here", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.Equal(0, e.Report.PagesSent); // refused at Hello: not one page went
        Assert.Contains("already runs here", loop.DestinationFailure().Message);
        AssertRuns(twin, "on the source after the refusal");
        using var other = WritingVm("web2");
        other.Start();
        loop.Migrate(other);
        Assert.Equal(["web1", "web2"], loop.Listener.Registry.List().Vms.Select(v => v.Name));
    }

    [Fact]
    public void A_name_is_reserved_from_hello_until_the_arrival_ends()
    {
        var registry = new VmRegistry();
        var a = new MigrationProgress(Guid.NewGuid(), "destination", "precopy", "db", 1 << 26, "");
        var b = new MigrationProgress(Guid.NewGuid(), "destination", "precopy", "db", 1 << 26, "");
        Assert.Null(registry.TryReserve(a));
        Assert.Contains("is arriving here already", registry.TryReserve(b));
        Assert.Single(registry.List().Migrations);
        registry.EndArrival(b); // a refused Hello ends without touching the other's reservation
        Assert.Contains("is arriving here already", registry.TryReserve(b));
        registry.EndArrival(a); // the first arrival failed: the name is free again
        Assert.Null(registry.TryReserve(b));
        Assert.Equal(b.MigrationId.ToString(), registry.List().Migrations.Single().MigrationId);
    }

    [Fact]
    public void A_vm_migrates_onward_from_agent_to_agent_and_its_guest_keeps_writing_with_its_invariant_intact()
    {
        using var a = new Loopback();
        using var b = new Loopback();
        using var c = new Loopback();
        using var vm = WritingVm("mtd");
        vm.Start();
        var (_, atA) = a.Migrate(vm);
        AssertRuns(atA.Vm, "on agent A");

        var toB = a.Listener.Registry.MigrateAway("mtd", new MigrationOptions(), "127.0.0.1", b.Port);
        Assert.True(toB.Verified);
        Assert.Empty(a.Listener.Registry.List().Vms); // it left A only once the migration completed
        var atB = b.Listener.Registry.Find("mtd")!;
        AssertRuns(atB, "on agent B");
        Assert.Equal(toB.MigrationId, b.Listener.Registry.List().Vms.Single().ArrivedBy);

        var toC = b.Listener.Registry.MigrateAway("mtd", new MigrationOptions(), "127.0.0.1", c.Port);
        Assert.True(toC.Verified);
        Assert.Empty(b.Listener.Registry.Vms);
        var atC = c.Listener.Registry.Find("mtd")!;
        AssertRuns(atC, "on agent C");
        atC.Pause();
        Assert.Null(atC.CheckInvariant());
        Assert.Equal("paused", c.Listener.Registry.List().Vms.Single().State);
    }

    [Fact]
    public void A_failed_onward_migration_leaves_the_vm_running_where_it_was()
    {
        using var a = new Loopback();
        using var vm = WritingVm("stay");
        vm.Start();
        a.Migrate(vm);
        int deadPort = FreePort();
        var e = Assert.Throws<MigrationFailedException>(() => a.Listener.Registry.MigrateAway("stay", new MigrationOptions(), "127.0.0.1", deadPort));
        Assert.Contains("cannot connect", e.Message);
        var listing = a.Listener.Registry.List();
        Assert.Equal("running", listing.Vms.Single().State);
        Assert.Null(listing.Vms.Single().LeavingBy);
        Assert.Empty(listing.Migrations);
        AssertRuns(a.Listener.Registry.Find("stay")!, "on the agent after the failed migration");
    }

    [Fact]
    public void A_leaving_vm_cannot_be_stopped_destroyed_or_sent_twice_and_its_migration_is_listed_while_it_runs()
    {
        using var a = new Loopback();
        using var b = new Loopback();
        using var vm = WritingVm("busy");
        vm.Start();
        a.Migrate(vm);
        var registry = a.Listener.Registry;
        MigrationStatus? seen = null;
        registry.MigrateAway("busy", new MigrationOptions(), "127.0.0.1", b.Port, started: m =>
        {
            Assert.Contains("is migrating", Assert.Throws<InvalidOperationException>(() => registry.Destroy("busy")).Message);
            Assert.Contains("is migrating", Assert.Throws<InvalidOperationException>(() => registry.Stop("busy")).Message);
            Assert.Contains("is migrating", Assert.Throws<InvalidOperationException>(() => registry.MigrateAway("busy", new MigrationOptions(), "127.0.0.1", b.Port)).Message);
            Assert.Equal("migrating", registry.List().Vms.Single().State);
            Assert.Same(m, registry.Outgoing(m.MigrationId));
            seen = registry.Status(m.MigrationId);
        });
        Assert.NotNull(seen);
        Assert.Equal("source", seen!.Role);
        Assert.Equal($"127.0.0.1:{b.Port}", seen.Peer);
        Assert.Equal("busy", seen.VmName);
        Assert.Empty(registry.List().Migrations);
    }

    [Fact]
    public void Stop_pauses_start_resumes_and_a_stopped_vm_is_not_migrated()
    {
        using var a = new Loopback();
        using var vm = WritingVm("s1");
        vm.Start();
        var (_, arrived) = a.Migrate(vm);
        var registry = a.Listener.Registry;
        registry.Stop("s1");
        Assert.Equal(VmRunState.Paused, arrived.Vm.State);
        Assert.Contains("start it", Assert.Throws<InvalidOperationException>(() => registry.MigrateAway("s1", new MigrationOptions(), "127.0.0.1", 1)).Message);
        registry.Start("s1");
        AssertRuns(arrived.Vm, "after start");
        Assert.Contains("no VM named 'nope'", Assert.Throws<InvalidOperationException>(() => registry.Stop("nope")).Message);
    }

    [Fact]
    public void The_destination_lists_an_arriving_migration_with_its_live_figures()
    {
        using var b = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { Name = "slow", MemoryBytes = 64L << 20, Vcpus = 1, Workload = "idle", Fill = MemoryFill.Random, Seed = 2 });
        vm.Start();
        var registry = b.Listener.Registry;
        MigrationStatus? during = null;
        var watch = new RoundWatch(round =>
        {
            if (round.Round != 0) return;
            // The destination has read this round's RoundEnd by the time the source asks the next Sync: bounded wait for it.
            var id = Guid.Parse(registry.List().Migrations.Single().MigrationId);
            Wait.Until(() => registry.Status(id) is { PagesTransferred: > 0, ExpectedDowntimeMs: >= 0 });
            during = registry.Status(id);
        });
        var (report, _) = b.Migrate(vm, new MigrationOptions { BandwidthLimit = 64L << 20 }, watch);
        Assert.NotNull(during);
        Assert.Equal("destination", during!.Role);
        Assert.Equal("slow", during.VmName);
        Assert.Equal(report.MigrationId, during.MigrationId);
        Assert.Equal(0, during.Round);
        Assert.Equal(report.Rounds[0].PagesSent, during.PagesTransferred);
        Assert.Equal(report.Rounds[0].PagesDirtied, during.PagesRemaining);
        Assert.True(during.BytesTransferred >= report.Rounds[0].BytesSent, $"{during.BytesTransferred} < {report.Rounds[0].BytesSent}");
        Assert.True(during.BandwidthBytesPerSecond > 0);
        Assert.Empty(registry.List().Migrations); // over: only the VM is left
        Assert.Equal(report.MigrationId, registry.List().Vms.Single().ArrivedBy);
    }

    private sealed class RoundWatch(Action<RoundReport> onRound) : IMigrationObserver
    {
        public void RoundCompleted(RoundReport round) => onRound(round);
    }

    [Fact]
    public void Destroy_gives_back_the_memory_and_threads_of_every_arrived_vm()
    {
        using var a = new Loopback();
        const int count = 4;
        // Counted by name (its guest memory's memfd, its vCPU threads): other tests run beside this one in the process.
        string[] names = [.. Enumerable.Range(0, count).Select(i => $"gone{i}")];
        foreach (string name in names)
        {
            using var vm = BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = 64L << 20, Vcpus = 2, Workload = "idle", Fill = MemoryFill.Random });
            vm.Start();
            a.Migrate(vm);
        }
        foreach (string name in names)
        {
            Assert.True(GuestMappings(name) > 0, $"no mapping of {name}'s guest memory");
            Assert.Equal(2, VcpuThreads(name));
        }
        foreach (string name in names) a.Listener.Registry.Destroy(name);
        Assert.Empty(a.Listener.Registry.Vms);
        foreach (string name in names)
        {
            Assert.Equal(0, GuestMappings(name));
            Assert.Equal(0, VcpuThreads(name));
        }
    }

    /// <summary>Mappings of the destination's memfd for VM <paramref name="name"/> (BuiltInVmFactory names it livemig-in-NAME).</summary>
    private static int GuestMappings(string name) => File.ReadLines("/proc/self/maps").Count(l => l.Contains($"/memfd:livemig-in-{name} "));

    /// <summary>Threads of this process named NAME/vcpuN (the kernel keeps 15 characters of a name).</summary>
    private static int VcpuThreads(string name) =>
        Directory.GetDirectories("/proc/self/task").Count(t => { try { return File.ReadAllText(Path.Combine(t, "comm")).StartsWith(name + "/vcpu", StringComparison.Ordinal); } catch (IOException) { return false; } });

    private static int FreePort()
    {
        var l = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        l.Start();
        int port = ((System.Net.IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }
}
