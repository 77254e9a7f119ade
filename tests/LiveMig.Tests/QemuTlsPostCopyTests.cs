using LiveMig.Engine;
using LiveMig.Qemu;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// Post-copy of a QEMU guest over TLS: the native fault loop that serves the destination QEMU's
/// faults reads and writes the page-request connection's TLS records itself (the record layer's
/// keys and sequence numbers lent to it), so an encrypted migration needs no plain socket.
/// </summary>
[Trait("Category", "Qemu")]
public class QemuTlsPostCopyTests
{
    [SkippableFact]
    public void A_guest_that_keeps_writing_moves_by_post_copy_over_tls_verified_and_checks_itself()
    {
        string image = QemuGuest.Image(100);
        string dir = QemuGuest.ImageDirectory();
        Skip.If(!QemuGuest.AgentBuilt, "the agent preloaded into QEMU (liblivemig_qemu_agent.so) was not built: gcc is missing");
        Skip.If(!File.Exists(Path.Combine(AppContext.BaseDirectory, "liblivemig_uffd.so")), "the native fault loop (liblivemig_uffd.so) was not built: gcc or libxxhash0 is missing");
        var psk = ChannelSecurity.FromPreSharedKey(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32));
        using var loop = new PostCopyLoopback(new DestinationOptions { VmFactories = [new QemuVmFactory(QemuGuest.Host(dir))], Security = psk });
        using var source = QemuVm.Start("qemu-postcopy-tls", QemuGuest.Spec(image, 128), QemuGuest.Host(dir));
        QemuGuest.WaitForReports(source.SerialLog, 0, 2, TimeSpan.FromSeconds(60));

        var (report, arrived) = loop.Migrate(source, QemuPostCopyTests.Options(MigrationStrategy.PostCopy, 64L << 20) with { Security = psk });

        PostCopyTests.CheckVerified(report, arrived);
        Assert.Equal("tls13-psk", report.Security);
        Assert.Equal("userfaultfd-remote", arrived.Report.DemandPaging);
        Assert.True(arrived.Report.Faults > 0, "the destination QEMU never faulted on a missing page");
        Assert.True(report.PagesRequested > 0, "no page was requested on demand: the TLS records of the page-request connection were not exercised");
        using var dest = Assert.IsType<QemuVm>(arrived.Vm);
        var last = BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog))!.Value;
        var there = QemuGuest.WaitForReports(dest.SerialLog, last.Passes, 2, TimeSpan.FromSeconds(60));
        Assert.Equal(0, there.Errors);
    }
}
