using System.Diagnostics;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Protocol;
using LiveMig.Qemu;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// The boot-sector guest (guests/bootsector) under QEMU, built with nasm by its own script:
/// what these tests need, or why they skip. QEMU under TCG; the guest's RAM is small (64–128 MiB).
/// </summary>
internal static class QemuGuest
{
    private static readonly Lazy<(string? Dir, string? Why)> Built = new(Build);

    /// <summary>Skips the test, saying why, when qemu-system-x86_64 or nasm is missing (scripts/install-qemu.sh installs both).</summary>
    public static string ImageDirectory()
    {
        var (dir, why) = Built.Value;
        Skip.If(dir is null, why);
        return dir!;
    }

    /// <summary>The image rewriting <paramref name="rangeMib"/> MiB of pages (built once per size).</summary>
    public static string Image(int rangeMib)
    {
        string dir = ImageDirectory();
        string path = Path.Combine(dir, $"bootsector-{rangeMib}.img");
        lock (Built)
        {
            // Built again when the guest's source is newer than the image (the directory is kept between runs).
            if (!File.Exists(path) || File.GetLastWriteTimeUtc(path) < File.GetLastWriteTimeUtc(Path.Combine(Path.GetDirectoryName(BuildScript)!, "bootsector.asm")))
                Run("bash", [BuildScript, path], ("RANGE_MIB", rangeMib.ToString()), ("REPORT_EVERY", "16"));
        }
        return path;
    }

    private static string BuildScript => Path.Combine(AppContext.BaseDirectory, "guests", "bootsector", "build.sh");

    private static (string?, string?) Build()
    {
        if (!OperatingSystem.IsLinux()) return (null, "QEMU guests need Linux");
        foreach (string tool in new[] { "qemu-system-x86_64", "nasm" })
            if (!OnPath(tool)) return (null, $"{tool} is missing (scripts/install-qemu.sh installs qemu-system-x86 and nasm): the QEMU guest tests cannot run");
        if (!File.Exists(BuildScript)) return (null, $"the guest's build script {BuildScript} is missing from the test output");
        return (Directory.CreateDirectory(Path.Combine(Path.GetTempPath(), "livemig-qemu-test-images")).FullName, null);
    }

    private static bool OnPath(string tool) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries).Any(d => File.Exists(Path.Combine(d, tool)));

    private static void Run(string exe, string[] args, params (string, string)[] env)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in args) psi.ArgumentList.Add(a);
        foreach (var (k, v) in env) psi.Environment[k] = v;
        using var p = Process.Start(psi)!;
        string err = p.StandardError.ReadToEnd();
        p.StandardOutput.ReadToEnd();
        Assert.True(p.WaitForExit(60_000), $"{exe} did not finish within 60 s");
        Assert.True(p.ExitCode == 0, $"{exe} {string.Join(' ', args)} failed: {err}");
    }

    /// <summary>Whether the dirty-page agent was built next to the tests (it needs gcc).</summary>
    public static bool AgentBuilt => File.Exists(new QemuHostOptions().AgentLibrary);

    public static QemuHostOptions Host(string imageDir, bool hashAtSwitchover = true, QemuDirtyLog dirtyLog = QemuDirtyLog.Auto) => new()
    {
        AllowedImageDirectories = [imageDir],
        DirtyLog = dirtyLog,
        RunDirectory = Path.Combine(Path.GetTempPath(), "livemig-qemu-tests"),
        HashRamAtSwitchover = hashAtSwitchover,
    };

    public static QemuVmSpec Spec(string image, long memoryMib) => new() { MemoryBytes = memoryMib << 20, BootImage = image };

    /// <summary>Waits (bounded) until the guest's serial log reports at least <paramref name="lines"/> lines past <paramref name="after"/> passes; the last report.</summary>
    public static BootSectorReport WaitForReports(string serialLog, long after, int lines, TimeSpan within)
    {
        var sw = Stopwatch.StartNew();
        BootSectorReport? last = null;
        while (sw.Elapsed < within)
        {
            string log = BootSectorSerial.Read(serialLog);
            int seen = 0;
            foreach (var line in log.Split('\n'))
                if (BootSectorSerial.Parse(line) is { } r && r.Passes > after) { seen++; last = r; }
            if (seen >= lines) return last!.Value;
            Thread.Sleep(50);
        }
        Assert.Fail($"the guest reported {(last is null ? "nothing" : $"up to {last}")} past {after} passes within {within.TotalSeconds:0} s (serial log {serialLog})");
        return default;
    }
}

/// <summary>The Linux guest (guests/linux/build.sh: Debian's cloud kernel, busybox and redis), built once per run of its script.</summary>
internal static class LinuxGuest
{
    private static readonly Lazy<(string? Dir, string? Why)> Built = new(Build);

    /// <summary>The directory holding vmlinuz and initrd.gz; skips, saying why, when it cannot be built (QEMU missing, no Debian archive reachable).</summary>
    public static string Directory()
    {
        QemuGuest.ImageDirectory(); // QEMU and nasm, or skip
        var (dir, why) = Built.Value;
        Skip.If(dir is null, why);
        return dir!;
    }

    private static (string?, string?) Build()
    {
        string script = Path.Combine(AppContext.BaseDirectory, "guests", "linux", "build.sh");
        string dir = Path.Combine(Path.GetTempPath(), "livemig-qemu-test-linux");
        string initrd = Path.Combine(dir, "initrd.gz");
        if (File.Exists(initrd) && File.GetLastWriteTimeUtc(initrd) > File.GetLastWriteTimeUtc(script)) return (dir, null);
        var psi = new ProcessStartInfo("bash") { RedirectStandardError = true, RedirectStandardOutput = true };
        psi.ArgumentList.Add(script);
        psi.ArgumentList.Add(dir);
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEndAsync();
        p.StandardOutput.ReadToEnd();
        if (!p.WaitForExit(300_000)) { p.Kill(); return (null, "guests/linux/build.sh did not finish within 5 minutes"); }
        return p.ExitCode == 0 ? (dir, null) : (null, $"guests/linux/build.sh could not build the Linux guest (it fetches Debian packages with apt-get download): {err.Result.Trim().Split('\n').LastOrDefault()}");
    }

    public static QemuVmSpec Spec(string dir) => new()
    {
        MemoryBytes = 256 << 20, Kernel = Path.Combine(dir, "vmlinuz"), Initrd = Path.Combine(dir, "initrd.gz"), Append = "console=ttyS0 quiet", Network = "user",
    };

    /// <summary>The last heartbeat ("livemig-linux: alive N") in a serial log, or 0.</summary>
    public static long LastHeartbeat(string serialLog)
    {
        long last = 0;
        foreach (var line in BootSectorSerial.Read(serialLog).Split('\n'))
            if (line.StartsWith("livemig-linux: alive ") && long.TryParse(line.AsSpan(21).Trim(), out long n)) last = n;
        return last;
    }

    public static void WaitFor(Func<bool> condition, string what, TimeSpan within)
    {
        var sw = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(sw.Elapsed < within, $"{what} within {within.TotalSeconds:0} s");
            Thread.Sleep(100);
        }
    }
}

/// <summary>Real QEMU guests migrated by LiveMig (trait qemu: .ci/run runs them with qemu.runsettings; they skip without QEMU or nasm).</summary>
[Trait("Category", "Qemu")]
public class QemuTests
{
    private static MigrationOptions Options(long bandwidth = 0) => new()
    {
        BandwidthLimit = bandwidth,
        // The guest rewrites its whole range hundreds of times a second: pre-copy cannot converge,
        // so after a few rounds the VM is paused and the rest goes in the stop-and-copy.
        PreCopy = new PreCopyOptions { MaxRounds = 3, OnStall = StallAction.Pause, MaxDowntime = TimeSpan.FromSeconds(30) },
    };

    [SkippableFact]
    public void A_guest_starts_pauses_resumes_and_saves_its_device_state()
    {
        string image = QemuGuest.Image(24);
        using var vm = QemuVm.Start("qemu-basic", QemuGuest.Spec(image, 32), QemuGuest.Host(QemuGuest.ImageDirectory()));
        Assert.Equal(1, vm.VcpuCount);
        Assert.Equal("qemu", vm.Kind);
        var before = QemuGuest.WaitForReports(vm.SerialLog, 0, 2, TimeSpan.FromSeconds(60));
        vm.Pause();
        // Paused, the guest writes nothing: its RAM hashes the same twice.
        ulong h1 = vm.Memory.ComputeHash();
        Thread.Sleep(100);
        Assert.Equal(h1, vm.Memory.ComputeHash());
        byte[] state = vm.SaveState();
        Assert.InRange(state.Length, 1 << 10, 16 << 20); // device and vCPU state only: the RAM is not in it
        Assert.Equal(h1, vm.RamHashAtPause);
        vm.Resume(); // after its own migration completed, QEMU goes on here (postmigrate → running)
        var after = QemuGuest.WaitForReports(vm.SerialLog, before.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, after.Errors);
        Assert.Null(vm.CheckInvariant());
        Assert.Throws<NotSupportedException>(() => vm.Throttle(0.5));
        Assert.Throws<NotSupportedException>(() => vm.LimitDirtyRate(100));
    }

    [SkippableFact]
    public void A_pause_is_QEMUs_own_stop_before_its_switch_over_and_a_resume_before_the_save_cancels_it()
    {
        string image = QemuGuest.Image(24);
        using var vm = QemuVm.Start("qemu-preswitch", QemuGuest.Spec(image, 32), QemuGuest.Host(QemuGuest.ImageDirectory()));
        var before = QemuGuest.WaitForReports(vm.SerialLog, 0, 2, TimeSpan.FromSeconds(60));
        vm.Pause();
        // QEMU has stopped the guest itself, its set-up done, and waits for LiveMig's word.
        Assert.Equal("pre-switchover", vm.Process.Qmp.Execute("query-migrate")?["status"]?.GetValue<string>());
        Assert.Equal(false, vm.Process.Qmp.Execute("query-status")?["running"]?.GetValue<bool>());
        vm.Resume(); // a failure before the save: the migration is cancelled and the guest runs on
        Assert.Equal("cancelled", vm.Process.Qmp.Execute("query-migrate")?["status"]?.GetValue<string>());
        Assert.Equal(true, vm.Process.Qmp.Execute("query-status")?["running"]?.GetValue<bool>());
        var after = QemuGuest.WaitForReports(vm.SerialLog, before.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, after.Errors);
        // And again, this time saved: the same path a switch-over takes.
        vm.Pause();
        Assert.InRange(vm.SaveState().Length, 1 << 10, 16 << 20);
        Assert.Equal("completed", vm.Process.Qmp.Execute("query-migrate")?["status"]?.GetValue<string>());
        vm.Resume();
        Assert.Equal(0, QemuGuest.WaitForReports(vm.SerialLog, after.Passes, 2, TimeSpan.FromSeconds(60)).Errors);
    }

    [SkippableTheory]
    [InlineData(QemuDirtyLog.PageHash)]
    [InlineData(QemuDirtyLog.Agent)]
    public void A_guest_that_keeps_writing_migrates_over_loopback_and_checks_itself_on_the_destination(QemuDirtyLog dirtyLog)
    {
        string image = QemuGuest.Image(100);
        string dir = QemuGuest.ImageDirectory();
        Skip.If(dirtyLog == QemuDirtyLog.Agent && !QemuGuest.AgentBuilt, "the dirty-page agent (liblivemig_qemu_agent.so) was not built: gcc is missing");
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [BuiltInVmFactory.Instance, factory] });
        using var source = QemuVm.Start("qemu-migrates", QemuGuest.Spec(image, 128), QemuGuest.Host(dir, dirtyLog: dirtyLog));
        QemuGuest.WaitForReports(source.SerialLog, 0, 2, TimeSpan.FromSeconds(60));

        var (report, arrived) = loop.Migrate(source, Options());

        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(dirtyLog == QemuDirtyLog.Agent ? "qemu-uffd-wp" : "page-hash", report.DirtyLog);
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        // The RAM as the source left it at the pause is what the destination held before QEMU loaded the device state.
        Assert.NotNull(source.RamHashAtPause);
        Assert.Equal(source.RamHashAtPause, dest.RamHashBeforeDeviceLoad);
        // The source QEMU is gone; the guest goes on at the destination where it stopped, and finds every page as it left it.
        Assert.Equal(VmRunState.Stopped, source.State);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        var there = QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, there.Errors);
        Assert.Null(dest.CheckInvariant());
    }

    [SkippableFact]
    public void Killing_the_destination_QEMU_during_the_copy_fails_the_migration_and_the_source_runs_on()
    {
        string image = QemuGuest.Image(48);
        string dir = QemuGuest.ImageDirectory();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-dest-dies", QemuGuest.Spec(image, 64), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));
        // Round 0 at 64 MiB/s takes about a second: the destination's QEMU is killed once it is under way.
        var killer = new KillOnProgress(factory);
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(source, Options(64L << 20), killer).MigrateTo("127.0.0.1", loop.Port));
        Assert.True(killer.Killed, "the destination QEMU was never killed");
        Assert.Contains("destination QEMU", e.Message);
        Assert.Contains("killed by signal 9", e.Message);
        Assert.Contains("destination QEMU", loop.DestinationFailure().Message);
        // The source VM was never paused for good: it keeps running and its guest keeps counting, error-free.
        Assert.Equal(VmRunState.Running, source.State);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        var later = QemuGuest.WaitForReports(source.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, later.Errors);
        Assert.Empty(factory.WaitingProcesses); // nothing left behind at the destination
    }

    [SkippableFact]
    public void Brakes_are_refused_for_a_QEMU_guest_and_without_the_agent_page_hashes_find_its_writes()
    {
        string image = QemuGuest.Image(24);
        // Without the agent library the guest's writes are found by page hashes, and the VM says why.
        using var vm = QemuVm.Start("qemu-refuses", QemuGuest.Spec(image, 32), QemuGuest.Host(QemuGuest.ImageDirectory()) with { AgentLibrary = "/nonexistent/liblivemig_qemu_agent.so" });
        Assert.Equal("page-hash", vm.DirtyLog.Name);
        Assert.Contains("agent library", vm.DirtyLogNote);
        var throttle = Assert.Throws<ArgumentException>(() => new PreCopyMigration(vm, new MigrationOptions { PreCopy = new PreCopyOptions { OnStall = StallAction.Throttle } }));
        Assert.Contains("cannot throttle", throttle.Message);
    }

    [SkippableFact]
    public void Killing_the_destination_QEMU_before_the_device_state_loads_resumes_the_source()
    {
        string image = QemuGuest.Image(24);
        string dir = QemuGuest.ImageDirectory();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-dest-dies-late", QemuGuest.Spec(image, 32), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));
        // Killed when the source pauses: the stop-and-copy and the device state are on their way.
        var killer = new KillAtPause(factory);
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(source, Options(), killer).MigrateTo("127.0.0.1", loop.Port));
        Assert.True(killer.Killed, "the destination QEMU was never killed");
        Assert.Contains("destination QEMU", e.Message);
        Assert.Contains("killed by signal 9", e.Message);
        // The source had saved its device state (QEMU: postmigrate) and goes on: cont, error-free.
        Assert.Equal(VmRunState.Running, source.State);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        Assert.Equal(0, QemuGuest.WaitForReports(source.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60)).Errors);
        loop.DestinationFailure();
        Assert.Empty(factory.WaitingProcesses);
    }

    [SkippableFact]
    public void Killing_the_source_QEMU_fails_the_migration_saying_so_and_the_destination_discards_its_copy()
    {
        string image = QemuGuest.Image(24);
        string dir = QemuGuest.ImageDirectory();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-source-dies", QemuGuest.Spec(image, 32), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));
        var killer = new KillSourceOnProgress(source);
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(source, Options(16L << 20), killer).MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains($"QEMU (pid {source.Process.Pid}) of VM qemu-source-dies was killed by signal 9", e.Message);
        Assert.Contains("source aborted", loop.DestinationFailure().Message);
        Assert.Empty(factory.WaitingProcesses);
    }

    [SkippableFact]
    public void A_destination_refuses_a_boot_image_outside_the_directories_it_allows()
    {
        string image = QemuGuest.Image(24);
        var elsewhere = Directory.CreateTempSubdirectory("lmqemu-other").FullName;
        var factory = new QemuVmFactory(QemuGuest.Host(elsewhere));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-refused", QemuGuest.Spec(image, 32), QemuGuest.Host(QemuGuest.ImageDirectory()));
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(source, Options()).MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("outside the directories this destination allows", e.Message);
        Assert.Equal(VmRunState.Running, source.State);
        Assert.Empty(factory.WaitingProcesses); // no QEMU was started there
    }

    [SkippableTheory]
    [InlineData(FrameType.PageBatch, 3)] // mid round 0
    [InlineData(FrameType.VmState, 1)]   // paused, device state saved (source QEMU: postmigrate): it runs on, and saves it again later
    [InlineData(FrameType.Prepare, 1)]   // the destination loaded the device state already: it starts a fresh QEMU over the same RAM file
    public void A_cut_connection_is_resumed_and_the_guest_arrives_verified(FrameType cut, int nth)
    {
        string image = QemuGuest.Image(24);
        string dir = QemuGuest.ImageDirectory();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-cut", QemuGuest.Spec(image, 32), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 1, TimeSpan.FromSeconds(60));
        ResumeTests.CutAt? first = null;
        var migration = new PreCopyMigration(source, Options() with { ReconnectWindow = TimeSpan.FromSeconds(20), PostCopy = new PostCopyOptions { FirstRetryDelay = TimeSpan.FromMilliseconds(10) } })
        {
            Connector = attempt => attempt == 0 ? first = new ResumeTests.CutAt(ResumeTests.Tcp(loop.Port), cut, nth) : ResumeTests.Tcp(loop.Port),
        };
        var report = migration.MigrateTo("127.0.0.1", loop.Port);
        Assert.True(first!.Cut);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.Equal(1, report.Reconnects);
        // The destination lists the VM once its own side of the Commit is done: a moment after the source's report, sometimes.
        Wait.Until(() => loop.Listener.Vms.Count == 1);
        var dest = Assert.IsType<QemuVm>(Assert.Single(loop.Listener.Vms));
        Assert.Equal(source.RamHashAtPause, dest.RamHashBeforeDeviceLoad);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        Assert.Equal(0, QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60)).Errors);
        Assert.Empty(factory.WaitingProcesses);
    }

    [SkippableFact]
    public void A_Linux_guest_running_redis_migrates_and_keeps_running_on_the_destination()
    {
        string dir = LinuxGuest.Directory();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-linux", LinuxGuest.Spec(dir), QemuGuest.Host(dir));
        LinuxGuest.WaitFor(() => BootSectorSerial.Read(source.SerialLog).Contains("Ready to accept connections"), "redis came up in the guest", TimeSpan.FromSeconds(90));
        LinuxGuest.WaitFor(() => LinuxGuest.LastHeartbeat(source.SerialLog) >= 2, "the guest's heartbeat", TimeSpan.FromSeconds(60));

        var (report, arrived) = loop.Migrate(source, Options());

        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        Assert.Equal(source.RamHashAtPause, dest.RamHashBeforeDeviceLoad);
        // The kernel, its timers and its init go on at the destination: the heartbeat counts on from the source's.
        long before = LinuxGuest.LastHeartbeat(source.SerialLog);
        LinuxGuest.WaitFor(() => LinuxGuest.LastHeartbeat(dest.SerialLog) >= before + 2, $"the heartbeat going on past {before} at the destination", TimeSpan.FromSeconds(60));
        Assert.DoesNotContain("Kernel panic", BootSectorSerial.Read(dest.SerialLog));
    }

    [SkippableFact]
    public void A_redis_client_reconnects_to_the_destinations_port_and_reads_back_every_key_it_wrote()
    {
        string dir = LinuxGuest.Directory();
        // Guest port 6379 forwarded on each side from a port that side's kernel picks: on one host the two do not collide.
        var spec = LinuxGuest.Spec(dir) with { Forward = [6379] };
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new Loopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start("qemu-redis", spec, QemuGuest.Host(dir));
        LinuxGuest.WaitFor(() => BootSectorSerial.Read(source.SerialLog).Contains("Ready to accept connections"), "redis came up in the guest", TimeSpan.FromSeconds(90));
        int sourcePort = source.Process.ForwardedPorts[6379];
        int? destPort = null;
        using var probe = new RedisProbe(() =>
        {
            destPort ??= factory.WaitingProcesses.FirstOrDefault()?.ForwardedPorts[6379] ?? (loop.Listener.Vms.OfType<QemuVm>().FirstOrDefault()?.Process.ForwardedPorts[6379]);
            return destPort is int d ? [sourcePort, d] : [sourcePort];
        });
        probe.Start(TimeSpan.FromSeconds(60));
        LinuxGuest.WaitFor(() => probe.Requests >= 200, "200 replies from redis before the move", TimeSpan.FromSeconds(60));

        var (report, arrived) = loop.Migrate(source, Options());

        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        int arrivedPort = dest.Process.ForwardedPorts[6379];
        Assert.NotEqual(sourcePort, arrivedPort);
        long atMove = probe.Requests;
        LinuxGuest.WaitFor(() => probe.Requests >= atMove + 200, $"200 more replies after the move (from port {arrivedPort})", TimeSpan.FromSeconds(60));
        var seen = probe.Stop();
        var keys = probe.CheckKeys(TimeSpan.FromSeconds(30));

        // The client went from the source's port to the destination's, and every key it saw acknowledged is there with its value.
        Assert.Equal([sourcePort, arrivedPort], seen.PortsUsed);
        Assert.True(seen.Reconnects >= 1);
        Assert.Equal(0, seen.WrongAnswers);
        Assert.True(keys.Checked >= 200, $"only {keys.Checked} keys were written");
        Assert.True(keys.AllThere, keys.ToString());
        // The interruption it saw is at least the VM's pause and bounded by the test's waits.
        Assert.InRange(seen.LongestGapMs, report.DowntimeMs * 0.5, 60_000); // the pause ends a moment before the source hears it did
        Console.WriteLine($"redis through the move: longest gap {seen.LongestGapMs:0} ms (downtime {report.DowntimeMs:0} ms), {seen.Requests} replies, {seen.Errors} errors, {keys}");
    }

    /// <summary>Kills the QEMU waiting at the destination as the source pauses for the stop-and-copy.</summary>
    private sealed class KillAtPause(QemuVmFactory factory) : IMigrationObserver
    {
        public volatile bool Killed;

        public void Phase(string phase)
        {
            if (phase != "paused") return;
            foreach (var q in factory.WaitingProcesses) { q.Kill(); Killed = true; }
        }
    }

    /// <summary>Kills the source's own QEMU once round 0 has sent some pages.</summary>
    private sealed class KillSourceOnProgress(QemuVm source) : IMigrationObserver
    {
        public void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire)
        {
            if (pagesSentInRound >= 500) source.Process.Kill();
        }
    }

    /// <summary>Kills the QEMU waiting at the destination once round 0 has sent some pages.</summary>
    private sealed class KillOnProgress(QemuVmFactory factory) : IMigrationObserver
    {
        public volatile bool Killed;

        public void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire)
        {
            if (Killed || pagesSentInRound < 1000) return;
            foreach (var q in factory.WaitingProcesses) q.Kill();
            Killed = true;
        }
    }
}
