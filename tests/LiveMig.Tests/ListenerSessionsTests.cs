using System.Net;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>Each listener owns its registry of joinable migrations: a connection to another listener in the same process cannot join them.</summary>
public class ListenerSessionsTests
{
    private static BuiltInVm StartVm()
    {
        var vm = BuiltInVm.Create(new VmConfig { Name = "l" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 16L << 20, Workload = "sweep:rate=20000", Fill = MemoryFill.Mixed, Seed = 5 });
        vm.Start();
        return vm;
    }

    private static Stream Tcp(int port)
    {
        var c = new TcpClient { NoDelay = true };
        c.Connect(IPAddress.Loopback, port);
        return new NetworkStream(c.Client, ownsSocket: true);
    }

    private static void AssertUnharmedAndForgotten(BuiltInVm vm, params Loopback[] loops)
    {
        Assert.Equal(VmRunState.Running, vm.State);
        foreach (var loop in loops)
        {
            Assert.True(SpinWait.SpinUntil(() => loop.Listener.Sessions.Count == 0, TimeSpan.FromSeconds(10)), "a failed migration stays registered");
            Assert.Empty(loop.Listener.Vms);
        }
    }

    [Fact]
    public void Data_streams_of_listener_As_migration_are_refused_by_listener_B()
    {
        using var a = new Loopback();
        using var b = new Loopback();
        using var vm = StartVm();
        var options = new MigrationOptions { Streams = 2, StreamConnector = i => Tcp(i == 0 ? a.Port : b.Port) };
        var e = Assert.Throws<MigrationFailedException>(() => a.Migrate(vm, options));
        Assert.Contains("StreamAttach: no multi-stream migration", e.Message);
        Assert.Contains("is in progress here", e.Message);
        AssertUnharmedAndForgotten(vm, a, b);
    }

    [Fact]
    public void The_page_request_connection_of_listener_As_post_copy_is_refused_by_listener_B()
    {
        using var a = new Loopback();
        using var b = new Loopback();
        using var vm = StartVm();
        var migration = new PostCopyMigration(vm, PostCopyTests.PostCopy()) { Connector = (kind, _) => Tcp(kind == ChannelKind.Main ? a.Port : b.Port) };
        var e = Assert.Throws<MigrationFailedException>(() => migration.MigrateTo("127.0.0.1", a.Port));
        Assert.Contains("destination refused the page-request connection: Attach: no migration", e.Message);
        AssertUnharmedAndForgotten(vm, a, b);
    }

    [Fact]
    public void A_pre_copy_source_reattaching_to_listener_B_is_refused_while_listener_A_waits_for_it()
    {
        using var a = new Loopback(new DestinationOptions { ResumeWindow = TimeSpan.FromSeconds(3) });
        using var b = new Loopback();
        using var vm = StartVm();
        var migration = new PreCopyMigration(vm, ResumeTests.Resumable() with { ReconnectWindow = TimeSpan.FromSeconds(1) })
        {
            Connector = attempt => attempt == 0 ? new ResumeTests.CutAt(ResumeTests.Tcp(a.Port), FrameType.Sync, 1) : ResumeTests.Tcp(b.Port),
        };
        var e = Assert.Throws<MigrationFailedException>(() => migration.MigrateTo("127.0.0.1", a.Port));
        Assert.Contains("cannot resume", e.Message);
        Assert.Contains("is waiting here", e.Message);
        Assert.Equal(1, a.Listener.Sessions.Count); // A still holds the partial VM for its source, within its window
        Assert.Contains("did not come back", a.DestinationFailure().Message);
        AssertUnharmedAndForgotten(vm, a, b);
    }
}
