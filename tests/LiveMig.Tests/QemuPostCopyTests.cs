using LiveMig.Engine;
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
public class QemuPostCopyTests
{
    private static void SkipWithoutHelpers()
    {
        Skip.If(!QemuGuest.AgentBuilt, "the agent preloaded into QEMU (liblivemig_qemu_agent.so) was not built: gcc is missing");
        Skip.If(!File.Exists(Path.Combine(AppContext.BaseDirectory, "liblivemig_uffd.so")), "the native fault loop (liblivemig_uffd.so) was not built: gcc or libxxhash0 is missing");
    }

    internal static MigrationOptions Options(MigrationStrategy strategy, long bandwidth) => new()
    {
        Strategy = strategy,
        BandwidthLimit = bandwidth,
        // Hybrid: two pre-copy rounds (the guest rewrites its range continuously, so they never converge), then the switch.
        PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 2 } },
    };

    [SkippableTheory]
    [InlineData(MigrationStrategy.PostCopy)]
    [InlineData(MigrationStrategy.Hybrid)]
    public void A_guest_that_keeps_writing_moves_by_demand_paging_verified_and_checks_itself_on_the_destination(MigrationStrategy strategy)
    {
        string image = QemuGuest.Image(100);
        string dir = QemuGuest.ImageDirectory();
        SkipWithoutHelpers();
        var factory = new QemuVmFactory(QemuGuest.Host(dir));
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [factory] });
        using var source = QemuVm.Start($"qemu-{Migrations.Name(strategy)}", QemuGuest.Spec(image, 128), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 2, TimeSpan.FromSeconds(60));

        // 64 MiB/s: the push of ~100 MiB takes over a second, while the guest, running at the destination, touches every page.
        var (report, arrived) = loop.Migrate(source, Options(strategy, 64L << 20));

        PostCopyTests.CheckVerified(report, arrived);
        Assert.Equal(Migrations.Name(strategy), report.Strategy);
        // The source's paused RAM file, hashed from scratch, is what the destination's pages hash to as placed.
        Assert.Equal($"{source.RamHashAtPause:x16}", report.SourceHash);
        Assert.Equal("userfaultfd-remote", arrived.Report.DemandPaging);
        Assert.True(arrived.Report.Faults > 0, "the destination QEMU never faulted on a missing page");
        Assert.True(report.PagesRequested > 0, "no page was requested on demand");
        Assert.True(report.PagesPushed > 0, "no page was pushed");
        if (strategy == MigrationStrategy.Hybrid) Assert.NotEmpty(report.Rounds); // pre-copy rounds ran first
        Assert.Equal(VmRunState.Stopped, source.State);
        // The guest goes on at the destination where it stopped, and finds every page as it left it.
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        var there = QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, there.Errors);
        Assert.Null(dest.CheckInvariant());
    }
}
