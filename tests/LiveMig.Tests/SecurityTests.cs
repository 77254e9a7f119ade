using LiveMig.Engine;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Tests;

public class SecurityTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "livemig-certs-" + Guid.NewGuid().ToString("N"));
    private readonly string _otherDir = Path.Combine(Path.GetTempPath(), "livemig-certs-" + Guid.NewGuid().ToString("N"));

    public SecurityTests()
    {
        Certificates.WriteCaAndHosts(_dir, ["src.example", "dst.example", "127.0.0.1", "intruder.example"]);
        Certificates.WriteCaAndHosts(_otherDir, ["127.0.0.1"]);
    }

    public void Dispose()
    {
        Directory.Delete(_dir, true);
        Directory.Delete(_otherDir, true);
    }

    private ChannelSecurity Host(string name, string? dir = null, string[]? trust = null)
    {
        dir ??= _dir;
        return ChannelSecurity.FromCertificates(Path.Combine(dir, name + ".pem"), Path.Combine(dir, name + ".key"), Path.Combine(_dir, "ca.pem"), trust);
    }

    private static BuiltInVm SmallVm(string name = "vm0") => BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = 16L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Mixed });

    [Fact]
    public void Mutual_tls_with_certificates_migrates_and_names_the_source()
    {
        using var loop = new Loopback(new DestinationOptions { Security = Host("127.0.0.1", trust: ["src.example"]) });
        using var vm = SmallVm();
        vm.Start();
        var (report, arrived) = loop.Migrate(vm, new MigrationOptions { Security = Host("src.example") });
        Assert.True(report.Verified);
        Assert.Equal("tls13-certificates", report.Security);
        Assert.Equal("src.example", arrived.Report.Peer);
        // TLS authenticates every byte: the page frames carry no checksum of their own, on both sides.
        Assert.Equal("none", report.FrameCheck);
        Assert.Equal("none", arrived.Report.FrameCheck);
    }

    [Fact]
    public void A_source_the_destination_does_not_trust_is_refused()
    {
        using var loop = new Loopback(new DestinationOptions { Security = Host("127.0.0.1", trust: ["src.example"]) });
        using var vm = SmallVm();
        vm.Start();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { Security = Host("intruder.example") }).MigrateTo("127.0.0.1", loop.Port));
        var refused = loop.DestinationFailure();
        // The source is told why (over TLS, before the destination closes), without the trust list itself.
        Assert.Equal("destination refused: source 'intruder.example' is not in this destination's trust list", e.Message);
        Assert.Equal("source 'intruder.example' is not in this destination's trust list (src.example)", refused.Message);
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.Empty(loop.Listener.Vms);
    }

    [Fact]
    public void A_destination_with_a_certificate_from_another_ca_is_refused_by_the_source()
    {
        // The destination's certificate names 127.0.0.1 but is signed by a CA the source does not trust.
        var rogue = ChannelSecurity.FromCertificates(Path.Combine(_otherDir, "127.0.0.1.pem"), Path.Combine(_otherDir, "127.0.0.1.key"), Path.Combine(_dir, "ca.pem"));
        using var loop = new Loopback(new DestinationOptions { Security = rogue });
        using var vm = SmallVm();
        vm.Start();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { Security = Host("src.example") }).MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("not signed by the trusted CA", e.Message);
        Assert.Equal(VmRunState.Running, vm.State);
    }

    [Fact]
    public void A_plain_source_meeting_a_tls_destination_is_told_the_destination_expects_tls()
    {
        using var loop = new Loopback(new DestinationOptions { Security = Host("127.0.0.1"), IoTimeout = TimeSpan.FromSeconds(5) });
        using var vm = SmallVm();
        vm.Start();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) }).MigrateTo("127.0.0.1", loop.Port));
        Assert.Equal("destination refused: the destination expects TLS (--tls)", e.Message);
        var refused = loop.DestinationFailure();
        Assert.Matches(@"^the source at 127\.0\.0\.1:\d+ did not use TLS \(--tls\)$", refused.Message);
        Assert.Equal("failed", refused.Report.Outcome);
        Assert.Equal(VmRunState.Running, vm.State);
    }

    [Fact]
    public void A_tls_source_meeting_a_plain_destination_is_told_the_destination_does_not_use_tls()
    {
        using var loop = new Loopback(new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(5) });
        using var vm = SmallVm();
        vm.Start();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { Security = Host("src.example"), IoTimeout = TimeSpan.FromSeconds(5) }).MigrateTo("127.0.0.1", loop.Port));
        Assert.Equal("TLS with the destination 127.0.0.1 failed: the destination does not use TLS: it answered in plain LiveMig frames (--tls on this side only; start listen with --tls too, or migrate without it)", e.Message);
        Assert.Matches(@"^the source at 127\.0\.0\.1:\d+ spoke TLS; this destination does not use TLS \(--tls on the source only\)$", loop.DestinationFailure().Message);
        Assert.Equal(VmRunState.Running, vm.State);
    }

    [Fact]
    public void A_source_whose_certificate_another_ca_signed_is_told_why_it_was_refused()
    {
        using var loop = new Loopback(new DestinationOptions { Security = Host("127.0.0.1") });
        using var vm = SmallVm();
        vm.Start();
        // Its own certificate comes from another CA; it trusts the destination's CA.
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { Security = Host("127.0.0.1", dir: _otherDir) }).MigrateTo("127.0.0.1", loop.Port));
        Assert.StartsWith("destination refused: the source's certificate 'CN=127.0.0.1' is not signed by the trusted CA (", e.Message);
        Assert.DoesNotContain("closed the connection", e.Message);
        Assert.StartsWith("the source's certificate 'CN=127.0.0.1' is not signed by the trusted CA", loop.DestinationFailure().Message);
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.Empty(loop.Listener.Vms);
    }

    [Fact]
    public void One_certificate_carries_several_names_and_tls_hostname_chooses_the_one_checked()
    {
        string dir = Path.Combine(_dir, "multi");
        Certificates.WriteCaAndHosts(dir, [new Certificates.HostIdentity("dst", ["dst.lan", "127.0.0.1"]), new Certificates.HostIdentity("src", [])]);
        ChannelSecurity In(string name, string[]? trust = null) =>
            ChannelSecurity.FromCertificates(Path.Combine(dir, name + ".pem"), Path.Combine(dir, name + ".key"), Path.Combine(dir, "ca.pem"), trust);
        using (var cert = System.Security.Cryptography.X509Certificates.X509Certificate2.CreateFromPem(File.ReadAllText(Path.Combine(dir, "dst.pem"))))
            Assert.Equal(["dst", "dst.lan", "127.0.0.1"], Certificates.Names(cert));
        using var loop = new Loopback(new DestinationOptions { Security = In("dst", trust: ["src"]) });
        foreach (string? hostname in new[] { null, "dst.lan", "DST" })
        {
            using var vm = SmallVm("by-" + (hostname ?? "ip"));
            vm.Start();
            // By IP address (its IP name), or by a DNS name it carries given with --tls-hostname.
            var (report, arrived) = loop.Migrate(vm, new MigrationOptions { Security = In("src"), TlsHostname = hostname });
            Assert.True(report.Verified, hostname);
            Assert.Equal("src", arrived.Report.Peer);
        }
        using var other = SmallVm();
        other.Start();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(other, new MigrationOptions { Security = In("src"), TlsHostname = "db.example" }).MigrateTo("127.0.0.1", loop.Port));
        Assert.Equal("TLS with the destination db.example failed: the destination's certificate 'CN=dst' does not name 'db.example' (it names dst, dst.lan, 127.0.0.1): connect by one of those names, or give one with --tls-hostname", e.Message);
        Assert.Equal(VmRunState.Running, other.State);
    }

    [Fact]
    public void Pre_shared_key_authenticates_both_ways()
    {
        byte[] key = Enumerable.Range(0, 32).Select(i => (byte)i).ToArray();
        using (var loop = new Loopback(new DestinationOptions { Security = ChannelSecurity.FromPreSharedKey(key) }))
        using (var vm = SmallVm())
        {
            vm.Start();
            var (report, arrived) = loop.Migrate(vm, new MigrationOptions { Security = ChannelSecurity.FromPreSharedKey(key) });
            Assert.True(report.Verified);
            Assert.Equal("tls13-psk", report.Security);
            Assert.Equal("psk", arrived.Report.Peer);
        }
        byte[] wrong = (byte[])key.Clone();
        wrong[31] ^= 1;
        using (var loop = new Loopback(new DestinationOptions { Security = ChannelSecurity.FromPreSharedKey(key) }))
        using (var vm = SmallVm())
        {
            vm.Start();
            var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { Security = ChannelSecurity.FromPreSharedKey(wrong) }).MigrateTo("127.0.0.1", loop.Port));
            Assert.Contains("pre-shared key", e.Message);
            Assert.Contains("pre-shared key", loop.DestinationFailure().Message);
            Assert.Equal(VmRunState.Running, vm.State);
        }
        Assert.Throws<AuthenticationFailedException>(() => ChannelSecurity.FromPreSharedKey(new byte[8]));
    }
}
