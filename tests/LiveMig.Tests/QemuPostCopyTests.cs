using LiveMig.Engine;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Policies;
using LiveMig.Qemu;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// QEMU guests moved by post-copy and hybrid: the destination QEMU's faults on pages that have not
/// arrived are caught in QEMU's own mapping (the agent's userfaultfd, passed to LiveMig) and served
/// by LiveMig's native fault loop (trait qemu; they skip without QEMU, nasm or the native helpers).
/// </summary>
[Trait("Category", "Qemu")]
public class QemuPostCopyTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private static void SkipWithoutHelpers()
    {
        Skip.If(!QemuGuest.AgentBuilt, "the agent preloaded into QEMU (liblivemig_qemu_agent.so) was not built: gcc is missing");
        Skip.If(!File.Exists(Path.Combine(AppContext.BaseDirectory, "liblivemig_uffd.so")), "the native fault loop (liblivemig_uffd.so) was not built: gcc or libxxhash0 is missing");
    }

    /// <summary>The three ways into post-copy: "postcopy", "hybrid", and "onstall" (pre-copy that switches when its rounds stall, --on-stall postcopy).</summary>
    private static MigrationOptions Options(string way, long bandwidth) => way == "onstall"
        // The guest rewrites its range faster than any round sends it: after three rounds pre-copy calls it a stall.
        ? Options(MigrationStrategy.PreCopy, bandwidth) with { PreCopy = new PreCopyOptions { MaxRounds = 3, OnStall = StallAction.PostCopy } }
        : Options(way == "hybrid" ? MigrationStrategy.Hybrid : MigrationStrategy.PostCopy, bandwidth);

    internal static MigrationOptions Options(MigrationStrategy strategy, long bandwidth) => new()
    {
        Strategy = strategy,
        BandwidthLimit = bandwidth,
        // Hybrid: two pre-copy rounds (the guest rewrites its range continuously, so they never converge), then the switch.
        PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 2 } },
    };

    [SkippableTheory]
    [InlineData("postcopy")]
    [InlineData("hybrid")]
    [InlineData("onstall")]
    public void A_guest_that_keeps_writing_moves_by_demand_paging_verified_and_checks_itself_on_the_destination(string way)
    {
        string image = QemuGuest.Image(100);
        string dir = QemuGuest.ImageDirectory();
        SkipWithoutHelpers();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start($"qemu-{way}", QemuGuest.Spec(image, 128), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 2, TimeSpan.FromSeconds(60));

        // 64 MiB/s: the push of ~100 MiB takes over a second, while the guest, running at the destination, touches every page.
        var (report, arrived) = loop.Migrate(source, Options(way, 64L << 20));

        PostCopyTests.CheckVerified(report, arrived);
        Assert.Equal(way == "onstall" ? "precopy" : way, report.Strategy);
        // The source's paused RAM file, hashed from scratch, is what the destination's pages hash to as placed.
        Assert.Equal($"{source.RamHashAtPause:x16}", report.SourceHash);
        Assert.Equal("userfaultfd-remote", arrived.Report.DemandPaging);
        Assert.True(arrived.Report.Faults > 0, "the destination QEMU never faulted on a missing page");
        Assert.True(report.PagesRequested > 0, "no page was requested on demand");
        Assert.True(report.PagesPushed > 0, "no page was pushed");
        if (way != "postcopy") Assert.NotEmpty(report.Rounds); // pre-copy rounds ran first
        if (way == "onstall") Assert.Contains(report.Escalations, e => e.Contains("switched to post-copy"));
        CheckPostCopyFigures(report, arrived);
        Assert.Equal(VmRunState.Stopped, source.State);
        // The guest goes on at the destination where it stopped, and finds every page as it left it.
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        var there = QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, there.Errors);
        Assert.Null(dest.CheckInvariant());
    }

    [SkippableTheory]
    [InlineData(MigrationStrategy.PostCopy)]
    [InlineData(MigrationStrategy.Hybrid)]
    public void A_Linux_guest_running_redis_moves_by_demand_paging_and_keeps_running_on_the_destination(MigrationStrategy strategy)
    {
        string dir = LinuxGuest.Directory();
        SkipWithoutHelpers();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start($"qemu-linux-{Migrations.Name(strategy)}", LinuxGuest.Spec(dir), QemuGuest.Host(dir));
        LinuxGuest.WaitFor(() => BootSectorSerial.Read(source.SerialLog).Contains("Ready to accept connections"), "redis came up in the guest", TimeSpan.FromSeconds(90));
        LinuxGuest.WaitFor(() => LinuxGuest.LastHeartbeat(source.SerialLog) >= 2, "the guest's heartbeat", TimeSpan.FromSeconds(60));

        var (report, arrived) = loop.Migrate(source, Options(strategy, 128L << 20));

        PostCopyTests.CheckVerified(report, arrived);
        Assert.Equal($"{source.RamHashAtPause:x16}", report.SourceHash);
        Assert.Equal("userfaultfd-remote", arrived.Report.DemandPaging);
        Assert.True(arrived.Report.Faults > 0, "the destination QEMU never faulted on a missing page");
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        // The kernel, its timers and its init go on at the destination: the heartbeat counts on from the source's.
        long before = LinuxGuest.LastHeartbeat(source.SerialLog);
        LinuxGuest.WaitFor(() => LinuxGuest.LastHeartbeat(dest.SerialLog) >= before + 2, $"the heartbeat going on past {before} at the destination", TimeSpan.FromSeconds(60));
        Assert.DoesNotContain("Kernel panic", BootSectorSerial.Read(dest.SerialLog));
    }

    [SkippableTheory]
    [InlineData(MigrationStrategy.PostCopy)]
    [InlineData(MigrationStrategy.Hybrid)]
    public void A_redis_client_through_a_post_copy_move_of_the_Linux_guest_reads_back_every_key_it_wrote(MigrationStrategy strategy)
    {
        string dir = LinuxGuest.Directory();
        SkipWithoutHelpers();
        var spec = LinuxGuest.Spec(dir) with { Forward = [6379] };
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start($"qemu-redis-{Migrations.Name(strategy)}", spec, QemuGuest.Host(dir));
        LinuxGuest.WaitFor(() => BootSectorSerial.Read(source.SerialLog).Contains("Ready to accept connections"), "redis came up in the guest", TimeSpan.FromSeconds(90));
        int sourcePort = source.Process.ForwardedPorts[6379];
        int? destPort = null;
        using var probe = new RedisProbe(() =>
        {
            destPort ??= factory.WaitingProcesses.FirstOrDefault()?.ForwardedPorts[6379] ?? loop.Listener.Vms.OfType<QemuVm>().FirstOrDefault()?.Process.ForwardedPorts[6379];
            return destPort is int d ? [sourcePort, d] : [sourcePort];
        });
        probe.Start(TimeSpan.FromSeconds(60));
        LinuxGuest.WaitFor(() => probe.Requests >= 200, "200 replies from redis before the move", TimeSpan.FromSeconds(60));

        var (report, arrived) = loop.Migrate(source, Options(strategy, 128L << 20));

        PostCopyTests.CheckVerified(report, arrived);
        Assert.Equal("userfaultfd-remote", arrived.Report.DemandPaging);
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        int arrivedPort = dest.Process.ForwardedPorts[6379];
        long atMove = probe.Requests;
        // redis's pages arrive on demand: its replies go on at the destination while the rest is pushed.
        LinuxGuest.WaitFor(() => probe.Requests >= atMove + 200, $"200 more replies after the move (from port {arrivedPort})", TimeSpan.FromSeconds(60));
        var seen = probe.Stop();
        var keys = probe.CheckKeys(TimeSpan.FromSeconds(30));

        Assert.Equal([sourcePort, arrivedPort], seen.PortsUsed);
        Assert.Equal(0, seen.WrongAnswers);
        Assert.True(keys.Checked >= 200, $"only {keys.Checked} keys were written");
        Assert.True(keys.AllThere, keys.ToString());
        Assert.InRange(seen.LongestGapMs, report.DowntimeMs * 0.5, 60_000);
        output.WriteLine($"redis through {Migrations.Name(strategy)}: longest gap {seen.LongestGapMs:0} ms (downtime {report.DowntimeMs:0} ms), {seen.Requests} replies, {seen.Errors} errors, {keys}; faults {arrived.Report.Faults}");
    }

    /// <summary>The report's post-copy figures, as the destination's fault loop measured QEMU's faults and the source counted the pages.</summary>
    private static void CheckPostCopyFigures(MigrationReport report, ArrivedVm arrived)
    {
        var d = arrived.Report;
        Assert.Equal(d.Faults, report.Faults); // the destination's count, told to the source in PostCopyDone
        Assert.NotNull(d.FaultLatencyUs);
        Assert.True(d.FaultLatencyUs!.P50 > 0, "no fault latency was measured");
        Assert.True(d.FaultLatencyUs.P50 <= d.FaultLatencyUs.P99 && d.FaultLatencyUs.P99 <= d.FaultLatencyUs.Max, $"latency p50 {d.FaultLatencyUs.P50} p99 {d.FaultLatencyUs.P99} max {d.FaultLatencyUs.Max}");
        Assert.Equal(report.FaultLatencyUs!.P99, d.FaultLatencyUs.P99, 0.01);
        Assert.InRange(report.PagesPrepaged, 0, report.PagesPushed);
        Assert.True(d.PagesRequested > 0 && d.PagesPushed > 0, $"the destination placed {d.PagesPushed} pushed and {d.PagesRequested} requested pages");
        Assert.True(report.TimeToResumeMs > 0 && report.TimeToResumeMs < report.TotalTimeMs, $"time to resume {report.TimeToResumeMs} ms of {report.TotalTimeMs} ms");
        Assert.True(report.PostCopyMs > 0);
    }

    [SkippableTheory]
    [InlineData(ChannelKind.Main)]
    [InlineData(ChannelKind.Priority)]
    public void A_connection_cut_mid_post_copy_is_recovered_and_the_guest_arrives_verified(ChannelKind broken)
    {
        string image = QemuGuest.Image(48);
        string dir = QemuGuest.ImageDirectory();
        SkipWithoutHelpers();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-pc-cut", QemuGuest.Spec(image, 64), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));
        Func<bool>? cut = null;
        Stream Connect(ChannelKind kind, int attempt)
        {
            var s = loop.Connect();
            if (kind != broken || attempt != 0) return s;
            // The first connection of the kind dies inside post-copy: at the 4th frame of pushed
            // pages (main; pure post-copy sends no pages before the switch), or after a few hundred
            // answers to QEMU's faults (page requests).
            if (kind == ChannelKind.Main) { var c = new ResumeTests.CutAt(s, FrameType.PageBatch, 4); cut = () => c.Cut; return c; }
            var f = new FaultInjectingStream(s, new FaultPlan { DropAfter = 1L << 20 });
            cut = () => f.Triggered;
            return f;
        }
        var options = Options(MigrationStrategy.PostCopy, 32L << 20) with { PostCopy = new PostCopyOptions { FirstRetryDelay = TimeSpan.FromMilliseconds(20), MaxRetryDelay = TimeSpan.FromMilliseconds(200) } };

        var (report, arrived) = loop.Migrate(source, options, Connect);

        Assert.True(cut!(), "the connection was never cut");
        PostCopyTests.CheckVerified(report, arrived);
        Assert.Equal(1, report.NetworkFaults);
        Assert.Equal(1, arrived.Report.NetworkFaults);
        Assert.Equal($"{source.RamHashAtPause:x16}", report.SourceHash);
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        Assert.Equal(0, QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60)).Errors);
    }

    [SkippableFact]
    public void The_destination_QEMU_killed_mid_post_copy_the_source_keeps_the_paused_VM_and_every_page_and_says_so()
    {
        string image = QemuGuest.Image(48);
        string dir = QemuGuest.ImageDirectory();
        SkipWithoutHelpers();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        QemuVm? first = null;
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory], BeforeResume = vm => first ??= (QemuVm)vm });
        var failures = new System.Collections.Concurrent.ConcurrentQueue<string>(); // the migration's, and its source's refused reattaches
        loop.Listener.Failed += f => failures.Enqueue(f.Message);
        using var source = QemuVm.Start("qemu-pc-dest-dies", QemuGuest.Spec(image, 64), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));
        var phases = new Phases(output);
        // Once the push is under way (the guest runs at the destination), its QEMU is killed.
        phases.OnProgress = (round, done) => { if (done >= 256 && first is { } q && !phases.Killed) { phases.Killed = true; q.Process.Kill(); } };
        var engine = new PostCopyMigration(source, Options(MigrationStrategy.PostCopy, 16L << 20) with
        {
            PostCopy = new PostCopyOptions { RecoveryTimeout = TimeSpan.FromMilliseconds(500), FirstRetryDelay = TimeSpan.FromMilliseconds(20), MaxRetryDelay = TimeSpan.FromMilliseconds(100) },
        }, phases);
        MigrationReport? result = null;
        var run = new Thread(() => result = engine.MigrateTo("127.0.0.1", loop.Port)) { IsBackground = true };
        run.Start();

        // The destination fails the migration naming what happened; the source says it keeps the paused VM and every page.
        Wait.Until(() => failures.Any(f => f.Contains("destination QEMU")));
        Assert.True(phases.Killed, "the destination QEMU was never killed");
        Assert.Contains(failures, f => f.Contains($"destination QEMU (pid {first!.Process.Pid}) was killed by signal 9"));
        Wait.Until(() => phases.Saw("post-copy paused"));
        Assert.Contains(phases.Seen, p => p.StartsWith("post-copy paused") && p.Contains("this source keeps the paused VM, all 16384 of its pages"));
        Assert.Equal(VmRunState.Paused, source.State);
        Assert.True(run.IsAlive, "the source ended on its own after losing its destination");

        // Every page is still here: starting over from the paused VM brings the guest up elsewhere, consistent.
        engine.Target!.Restart("127.0.0.1", loop.Port);
        Assert.True(run.Join(TimeSpan.FromSeconds(120)), "starting over did not finish");
        Assert.Equal("completed", result!.Outcome);
        Assert.True(result.Verified);
        Assert.Equal($"{source.RamHashAtPause:x16}", result.SourceHash);
        var arrived = loop.WaitArrived();
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        Assert.Equal(0, QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60)).Errors);
    }

    [SkippableFact]
    public void Without_the_agent_in_the_destination_QEMU_post_copy_fails_before_the_switch_and_the_source_runs_on()
    {
        string image = QemuGuest.Image(24);
        string dir = QemuGuest.ImageDirectory();
        SkipWithoutHelpers();
        // A destination whose QEMU runs without LiveMig's agent cannot catch QEMU's faults: it must not take the VM.
        var factory = new QemuVmFactory(QemuGuest.Host(dir) with { AgentLibrary = "/nonexistent/liblivemig_qemu_agent.so" });
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-pc-no-agent", QemuGuest.Spec(image, 32), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));

        var e = Assert.Throws<MigrationFailedException>(() => new PostCopyMigration(source, Options(MigrationStrategy.PostCopy, 0)).MigrateTo("127.0.0.1", loop.Port));

        Assert.Contains("needs LiveMig's agent in the destination QEMU", e.Message);
        Assert.Contains("needs LiveMig's agent in the destination QEMU", loop.DestinationFailure().Message);
        Assert.Empty(factory.WaitingProcesses); // its QEMU is gone
        // Never committed: the source resumed its guest, which counts on error-free.
        Assert.Equal(VmRunState.Running, source.State);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        Assert.Equal(0, QemuGuest.WaitForReports(source.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60)).Errors);
    }

    /// <summary>The source's phases and push progress, for a test to act on.</summary>
    private sealed class Phases(Xunit.Abstractions.ITestOutputHelper output) : IMigrationObserver
    {
        private readonly List<string> _seen = [];
        public Action<int, long>? OnProgress;
        public volatile bool Killed;

        public IReadOnlyList<string> Seen { get { lock (_seen) return [.. _seen]; } }
        public bool Saw(string prefix) { lock (_seen) return _seen.Any(p => p.StartsWith(prefix, StringComparison.Ordinal)); }
        public void Phase(string phase)
        {
            lock (_seen) _seen.Add(phase);
            output.WriteLine($"{DateTime.Now:HH:mm:ss.fff} {phase}");
        }
        public void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire) => OnProgress?.Invoke(round, pagesSentInRound);
    }
}
