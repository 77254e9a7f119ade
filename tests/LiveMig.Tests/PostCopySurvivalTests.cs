using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// After the switch to post-copy neither side alone has the whole VM: neither gives it up on its
/// own. A source whose destination is lost stays post-copy paused with the paused VM and every
/// page the destination lacks, until the destination comes back, the operator starts it over
/// elsewhere, or discards it; a destination whose source is gone keeps its VM waiting.
/// </summary>
public sealed class PostCopySurvivalTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    /// <summary>A connection the test can cut, as a dead host or a pulled cable would.</summary>
    private sealed class Cuttable(Stream inner) : DelegatingStream(inner)
    {
        public void Cut() { try { Inner.Dispose(); } catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException) { } }
    }

    /// <summary>Connections to one destination, all cut at once; while down, new ones are refused.</summary>
    private sealed class Link(PostCopyLoopback loop)
    {
        private readonly List<Cuttable> _open = [];
        public volatile bool Down;

        public Stream Connect(ChannelKind kind, int attempt)
        {
            if (Down) throw new SocketException((int)SocketError.ConnectionRefused);
            var s = new Cuttable(loop.Connect());
            lock (_open) _open.Add(s);
            return s;
        }

        public void Fail()
        {
            Down = true;
            lock (_open) foreach (var s in _open) s.Cut();
        }
    }

    /// <summary>Records phases; signals when one starting with a prefix arrives.</summary>
    private sealed class Phases(ITestOutputHelper output) : IMigrationObserver
    {
        private readonly List<string> _seen = [];
        public Action<string>? OnPhase;

        public void Phase(string phase)
        {
            lock (_seen) _seen.Add(phase);
            output.WriteLine($"phase: {phase}");
            OnPhase?.Invoke(phase);
        }

        public bool Saw(string prefix) { lock (_seen) return _seen.Any(p => p.StartsWith(prefix, StringComparison.Ordinal)); }
    }

    private static BuiltInVm SweepingVm() => BuiltInVm.Create(new VmConfig
    {
        Name = "s" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 32L << 20, Vcpus = 2, Workload = "sweep:rate=20000,range=50%", Fill = MemoryFill.Mixed, Seed = 6,
    });

    /// <summary>A slow push (the link cut comes while pages are still to send) and short recovery waits.</summary>
    private static MigrationOptions Options() => PostCopyTests.PostCopy(bandwidth: 8L << 20) with
    {
        PostCopy = new PostCopyOptions { RecoveryTimeout = TimeSpan.FromMilliseconds(500), FirstRetryDelay = TimeSpan.FromMilliseconds(20), MaxRetryDelay = TimeSpan.FromMilliseconds(100) },
    };

    /// <summary>A migration on its own thread, so the test can act while it runs (and see that it has not ended).</summary>
    private sealed class Running
    {
        private readonly ManualResetEventSlim _done = new();
        public MigrationReport? Result { get; private set; }
        public MigrationFailedException? Error { get; private set; }

        public Running(Func<MigrationReport> migrate) =>
            new Thread(() =>
            {
                try { Result = migrate(); }
                catch (MigrationFailedException e) { Error = e; }
                finally { _done.Set(); }
            }) { IsBackground = true, Name = "test-migration" }.Start();

        public bool IsCompleted => _done.IsSet;
        public bool Wait(TimeSpan bound) => _done.Wait(bound);
    }

    private static Running Run(Func<MigrationReport> migrate) => new(migrate);

    /// <summary>
    /// Starts a post-copy migration of <paramref name="vm"/> to <paramref name="loop"/> whose link
    /// fails at the switch (and stays down), and waits until the source says it is post-copy paused.
    /// </summary>
    private (PostCopyMigration Engine, Running Run, Link Link, Phases Phases) CutAtTheSwitch(PostCopyLoopback loop, BuiltInVm vm)
    {
        var link = new Link(loop);
        var phases = new Phases(output);
        var engine = new PostCopyMigration(vm, Options(), phases) { Connector = link.Connect };
        phases.OnPhase = p => { if (p == "post-copy") link.Fail(); };
        var run = Run(() => engine.MigrateTo("127.0.0.1", loop.Port));
        Assert.True(SpinWait.SpinUntil(() => phases.Saw("post-copy paused"), Bound), "the source never said it is post-copy paused");
        return (engine, run, link, phases);
    }

    [Fact]
    public void Destination_lost_after_the_switch_the_source_keeps_the_paused_vm_and_starts_over_elsewhere_verified()
    {
        using var first = new PostCopyLoopback(new DestinationOptions { PostCopy = new() { Mode = DemandPagingMode.Portable } });
        using var second = new PostCopyLoopback();
        using var vm = SweepingVm();
        vm.Start();
        var (engine, run, link, phases) = CutAtTheSwitch(first, vm);
        Assert.False(run.Wait(TimeSpan.FromMilliseconds(500)), "the source ended on its own after losing its destination");
        Assert.Equal(VmRunState.Paused, vm.State);
        ulong paused = vm.Memory.ComputeHash();

        engine.Target!.Restart("127.0.0.1", second.Port);
        Assert.True(run.Wait(Bound), "starting over did not finish");
        Assert.Null(run.Error);
        var report = run.Result!;
        output.WriteLine(report.ToJson(indented: true));
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(paused.ToString("x16"), report.SourceHash);
        Assert.Contains(report.Escalations, l => l.StartsWith("post-copy paused", StringComparison.Ordinal));
        Assert.Contains(report.Escalations, l => l.Contains("started over from the paused VM"));
        var arrived = second.WaitArrived();
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant()); // the VM as it was at the switch, consistent
        // The first destination still waits for its source, VM and all, until an operator discards it.
        var waiting = Assert.Single(first.Listener.Sessions.WaitingForSource);
        Assert.True(first.Listener.Sessions.DiscardPostCopy(waiting, "test over"));
        var discarded = first.DestinationFailure();
        Assert.Contains("discarded by the operator", discarded.Message);
        Assert.Contains("never arrived are lost", discarded.Message);
    }

    [Fact]
    public void A_link_that_fails_after_every_reattach_with_no_page_delivered_stops_the_retries_and_keeps_the_paused_vm()
    {
        using var loop = new PostCopyLoopback(new DestinationOptions { PostCopy = new() { Mode = DemandPagingMode.Portable } });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 32L << 20, Workload = "idle", Fill = MemoryFill.Mixed, Seed = 4 });
        vm.Start();
        var phases = new Phases(output);
        int priorityConnections = 0;
        // Every page-request connection takes its Attach and dies at the next write (the late-zeros
        // bitmap after the resume, before any page): each reattach succeeds, then fails at once.
        Stream Connect(ChannelKind kind, int attempt)
        {
            var s = loop.Connect();
            if (kind != ChannelKind.Priority) return s;
            Interlocked.Increment(ref priorityConnections);
            return new FaultInjectingStream(s, new FaultPlan { DropAfter = 40 });
        }
        var engine = new PostCopyMigration(vm, Options(), phases) { Connector = Connect };
        var run = Run(() => engine.MigrateTo("127.0.0.1", loop.Port));
        Assert.True(SpinWait.SpinUntil(() => phases.Saw("post-copy paused") || run.IsCompleted, Bound), "the source never stopped retrying");
        Assert.False(run.IsCompleted, "the source ended instead of keeping the paused VM");
        Assert.True(phases.Saw("post-copy paused: the post-copy phase failed (the connection to the destination failed 5 times in a row with no page delivered"), "the source did not say why it stopped retrying");
        Assert.Equal(VmRunState.Paused, vm.State);
        Assert.InRange(Volatile.Read(ref priorityConnections), 5, 6);
        engine.Target!.Abandon();
        Assert.True(run.Wait(Bound), "discarding did not end the migration");
        Assert.Contains("abandoned by the operator", run.Error!.Message);
    }

    [Fact]
    public void Destination_lost_after_the_switch_an_operator_discard_ends_the_source_saying_what_is_lost()
    {
        using var first = new PostCopyLoopback(new DestinationOptions { PostCopy = new() { Mode = DemandPagingMode.Portable } });
        using var vm = SweepingVm();
        vm.Start();
        var (engine, run, link, phases) = CutAtTheSwitch(first, vm);

        engine.Target!.Abandon();
        Assert.True(run.Wait(Bound), "discarding did not end the migration");
        var e = run.Error;
        Assert.NotNull(e);
        Assert.Contains("abandoned by the operator", e!.Message);
        Assert.Contains("pages", e.Message);
        Assert.Equal("failed", e.Report.Outcome);
        Assert.Single(first.Listener.Sessions.WaitingForSource);
    }

    [Fact]
    public void Source_lost_after_the_switch_the_destination_keeps_the_vm_and_a_restarted_source_serves_the_rest_from_the_memory_file_verified()
    {
        string file = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), $"livemig-test-{Guid.NewGuid():N}.mem");
        try
        {
            using var loop = new PostCopyLoopback(new DestinationOptions { PostCopy = new() { Mode = DemandPagingMode.Portable } });
            using var vm = BuiltInVm.Create(new VmConfig { Name = "f" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 32L << 20, Vcpus = 2, Workload = "sweep:rate=20000,range=50%", Fill = MemoryFill.Mixed, Seed = 8, MemoryFile = file });
            vm.Start();
            var link = new Link(loop);
            var phases = new Phases(output);
            var first = new PostCopyMigration(vm, Options(), phases) { Connector = link.Connect };
            phases.OnPhase = p => { if (p == "post-copy") link.Fail(); }; // the first source is gone for good: it never gets through again
            var dying = Run(() => first.MigrateTo("127.0.0.1", loop.Port));
            Assert.True(SpinWait.SpinUntil(() => loop.Listener.Sessions.WaitingForSource.Count == 1, Bound), "the destination does not wait for its source");

            // A new source process: only the memory file and the migration ID.
            using var recovered = new PausedMemoryVm("recovered", GuestMemory.Open(file));
            ulong paused = recovered.Memory.ComputeHash();
            var report = PostCopyMigration.Recover(first.MigrationId, recovered, Options(), new Phases(output)).MigrateTo("127.0.0.1", loop.Port);
            output.WriteLine(report.ToJson(indented: true));
            Assert.Equal("completed", report.Outcome);
            Assert.True(report.Verified);
            Assert.Equal(paused.ToString("x16"), report.SourceHash);
            Assert.Contains(report.Escalations, l => l.Contains("recovered migration"));
            var arrived = loop.WaitArrived();
            Assert.True(arrived.Report.Verified);
            arrived.Vm.Pause();
            Assert.Null(arrived.Vm.CheckInvariant());

            first.Target!.Abandon(); // the first source's stand-in ends
            Assert.True(dying.Wait(Bound));
        }
        finally { File.Delete(file); }
    }

    [Fact]
    public void A_link_down_longer_than_both_recovery_windows_heals_when_it_comes_back_and_the_memory_verifies()
    {
        using var loop = new PostCopyLoopback(new DestinationOptions { PostCopy = new() { Mode = DemandPagingMode.Portable, RecoveryTimeout = Timeout.InfiniteTimeSpan } });
        using var vm = SweepingVm();
        vm.Start();
        var (engine, run, link, phases) = CutAtTheSwitch(loop, vm);
        Assert.True(SpinWait.SpinUntil(() => loop.Listener.Sessions.WaitingForSource.Count == 1, Bound), "the destination does not wait for its source");
        Assert.False(run.IsCompleted);

        link.Down = false; // the network is back: the paused source's next try gets through
        Assert.True(run.Wait(Bound), "post-copy did not recover once the link came back");
        Assert.Null(run.Error);
        var report = run.Result!;
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.True(report.NetworkFaults >= 1);
        var arrived = loop.WaitArrived();
        Assert.True(arrived.Report.Verified);
        arrived.Vm.Pause();
        Assert.Null(arrived.Vm.CheckInvariant());
    }
}
