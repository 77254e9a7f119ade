using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>The convergence aids end to end: a real VM migrated over loopback TCP.</summary>
public class ConvergeMigrationTests(ITestOutputHelper output)
{
    private void Show(string what, MigrationReport r)
    {
        output.WriteLine($"{what}: {r.StopReason}, {r.Rounds.Count} rounds, {r.PagesSent:N0} pages, downtime {r.DowntimeMs:0.0} ms, total {r.TotalTimeMs:0} ms, throttle {r.Throttle:0.00}, dirty limit {r.DirtyLimit}, " +
                         $"ops/s {r.OpsPerSecondBeforeThrottle:N0} -> {r.OpsPerSecondThrottled:N0}, lost {r.OperationsLost:N0}, skipped {r.PagesSkipped:N0}, deferred at stop {r.PagesDeferred:N0}");
        foreach (var x in r.Rounds)
            output.WriteLine($"  {x.Round}{(x.Final ? " final" : "")}: sent {x.PagesSent:N0}, pending after {x.PagesDirtied:N0}, {x.DurationMs:0} ms, throttle {x.Throttle:0.00}, limit {x.DirtyLimit}, skipped {x.PagesSkipped}, deferred {x.PagesDeferred}, est. {x.EstimatedDowntimeMs:0} ms");
    }

    /// <summary>
    /// random:rate=40000 over 8192 pages dirties most of them in the half second a round takes at
    /// 64 MiB/s: without help it never gets under a 50 ms downtime. Throttled hard enough (the
    /// workload loses work only once the vCPUs sleep more than they run) it converges.
    /// </summary>
    private static BuiltInVm NonConvergingVm(string name) =>
        BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = 32L << 20, Vcpus = 2, Workload = "random:rate=40000", Fill = MemoryFill.Mixed, Seed = 17 });

    private static MigrationOptions NonConvergingOptions(PreCopyOptions preCopy) => new()
    {
        BandwidthLimit = 64L << 20,
        PreCopy = preCopy with { DowntimeLimit = TimeSpan.FromMilliseconds(50), MaxRounds = 40 },
    };

    [Fact]
    public void Auto_converge_throttles_a_non_converging_guest_until_it_converges_and_releases_it()
    {
        using var loop = new Loopback(new DestinationOptions { VerifyFromScratch = true });
        using var vm = NonConvergingVm("ac");
        vm.Start();
        Wait.Until(() => vm.Operations > 5_000);
        // Larger steps than QEMU's 20/10 every 2 rounds, to keep the test short.
        var options = NonConvergingOptions(new PreCopyOptions { AutoConverge = new AutoConvergeOptions { Initial = 0.5, Increment = 0.2, TriggerRounds = 1 } });
        var (report, arrived) = loop.Migrate(vm, options);
        Show("auto-converge", report);

        Assert.True(report.Verified);
        Assert.Equal(report.SourceHash, arrived.Report.DestinationHash);
        Assert.True(report.Throttle >= 0.5, $"throttle {report.Throttle}");
        Assert.NotEqual("max-rounds", report.StopReason);
        Assert.Equal("downtime-target", report.StopReason);
        Assert.Contains("auto-converge", report.ConvergenceAids);
        // The throttle rose in steps, never fell, while live.
        var live = report.Rounds.Where(r => !r.Final).Select(r => r.Throttle).ToList();
        Assert.True(live.Zip(live.Skip(1)).All(p => p.Second >= p.First), string.Join(", ", live));
        Assert.True(live[^1] > live[0]);
        // Lost progress is measured against the rate before the first step.
        Assert.NotNull(report.OpsPerSecondBeforeThrottle);
        Assert.NotNull(report.OpsPerSecondThrottled);
        Assert.True(report.OperationsLost >= 0);
        Assert.True(report.ThrottledMs > 0);

        // Released on the source at the switch-over; the destination starts unthrottled and runs at full speed.
        Assert.Equal(0, vm.ThrottleFraction);
        Assert.Equal(0, vm.DirtyRateLimit);
        var dest = arrived.Vm;
        Assert.Equal(0, dest.ThrottleFraction);
        Assert.Equal(0, dest.DirtyRateLimit);
        long ops = dest.Operations;
        Assert.True(SpinWait.SpinUntil(() => dest.Operations > ops + 4_000, TimeSpan.FromSeconds(10)), "destination VM does not run");
    }

    [Fact]
    public void Dirty_limit_caps_a_non_converging_guest_and_the_report_shows_the_rate_it_was_held_to()
    {
        using var loop = new Loopback();
        using var vm = NonConvergingVm("dl");
        vm.Start();
        Wait.Until(() => vm.Operations > 5_000);
        const double limit = 1000; // pages/s per vCPU: 2,000/s for the VM, a twentieth of what it wants
        var (report, arrived) = loop.Migrate(vm, NonConvergingOptions(new PreCopyOptions { DirtyLimit = limit }));
        Show("dirty-limit", report);

        Assert.True(report.Verified);
        Assert.Equal(limit, report.DirtyLimit);
        Assert.Equal(0, report.Throttle);
        Assert.Contains(report.Rounds, r => r.DirtyLimit == limit);
        Assert.NotEqual("max-rounds", report.StopReason);
        // Measured by the VM's own operation counter: held to the limit (2× slack for a busy machine)...
        Assert.True(report.OpsPerSecondThrottled <= 2 * 2 * limit, $"{report.OpsPerSecondThrottled:N0} ops/s under a {2 * limit:N0}/s limit");
        // ...well below what it did before.
        Assert.True(report.OpsPerSecondBeforeThrottle > 4 * 2 * limit, $"{report.OpsPerSecondBeforeThrottle:N0} ops/s before");
        Assert.True(report.OperationsLost > 0);
        Assert.Equal(0, vm.DirtyRateLimit);
        Assert.Equal(0, arrived.Vm.DirtyRateLimit);
    }

    [Theory]
    [InlineData(DirtyLogKind.Kernel)]
    [InlineData(DirtyLogKind.Software)]
    public void Hot_page_deferral_sends_fewer_pages_for_the_same_hotcold_guest(DirtyLogKind kind)
    {
        MigrationReport Run(bool defer)
        {
            using var loop = new Loopback(new DestinationOptions { DirtyLog = kind, VerifyFromScratch = true });
            using var vm = BuiltInVm.Create(new VmConfig
            {
                Name = defer ? "hot" : "plain", MemoryBytes = 64L << 20, Vcpus = 2, Workload = "hotcold:wss=20%,skew=1.2,rate=100000", Fill = MemoryFill.Mixed, Seed = 5, DirtyLog = kind,
            });
            vm.Start();
            Wait.Until(() => vm.Operations > 20_000);
            var options = new MigrationOptions
            {
                BandwidthLimit = 64L << 20,
                PreCopy = new PreCopyOptions { DowntimeLimit = TimeSpan.FromMilliseconds(50), DeferHotPages = defer, SkipRewrittenPages = defer }.PauseOnStall(),
            };
            var (report, arrived) = loop.Migrate(vm, options);
            Assert.True(report.Verified);
            Assert.Equal(report.SourceHash, arrived.Report.DestinationHash);
            Show(defer ? "deferred" : "plain", report);
            return report;
        }

        var plain = Run(defer: false);
        var deferred = Run(defer: true);
        Assert.Contains(deferred.Rounds, r => r.PagesDeferred > 0);
        Assert.DoesNotContain(plain.Rounds, r => r.PagesDeferred > 0 || r.PagesSkipped > 0);
        Assert.Equal(kind == DirtyLogKind.Software, deferred.ConvergenceAids.Contains("skip-rewritten"));
        Assert.True(deferred.PagesSent < plain.PagesSent, $"with deferral {deferred.PagesSent:N0} pages, without {plain.PagesSent:N0}");
        // Deferred pages are sent at the latest in the stop-and-copy: the live rounds sum up with it.
        Assert.Equal(deferred.PagesSent, deferred.Rounds.Sum(r => r.PagesSent));
    }
}
