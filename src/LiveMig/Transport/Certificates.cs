using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace LiveMig.Transport;

/// <summary>A small CA and host certificates for trying TLS out (`livemig certs`); ECDSA P-256.</summary>
public static class Certificates
{
    public static X509Certificate2 SelfSigned(string name)
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var req = new CertificateRequest($"CN={name}", key, HashAlgorithmName.SHA256);
        using var cert = req.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddDays(1));
        return X509CertificateLoader.LoadPkcs12(cert.Export(X509ContentType.Pkcs12), null);
    }

    /// <summary>Writes ca.pem/ca.key and HOST.pem/HOST.key for each host into <paramref name="dir"/>; returns the files written.</summary>
    public static IReadOnlyList<string> WriteCaAndHosts(string dir, IEnumerable<string> hosts, int days = 365) =>
        WriteCaAndHosts(dir, hosts.Select(h => new HostIdentity(h, [])), days);

    /// <summary>
    /// One host's certificate: <see cref="Name"/> is its common name (the name a destination's
    /// trust list checks) and its files' name; it and every one of <see cref="Aliases"/> (DNS
    /// names or IP addresses) are subject alternative names, so a source may reach the host by any.
    /// </summary>
    public sealed record HostIdentity(string Name, IReadOnlyList<string> Aliases)
    {
        public IEnumerable<string> AllNames => Aliases.Prepend(Name).Distinct(StringComparer.OrdinalIgnoreCase);
    }

    /// <summary>Writes ca.pem/ca.key and NAME.pem/NAME.key for each host into <paramref name="dir"/>, one CA for all; returns the files written.</summary>
    public static IReadOnlyList<string> WriteCaAndHosts(string dir, IEnumerable<HostIdentity> hosts, int days = 365)
    {
        Directory.CreateDirectory(dir);
        var written = new List<string>();
        using var caKey = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var caReq = new CertificateRequest("CN=LiveMig test CA", caKey, HashAlgorithmName.SHA256);
        caReq.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        caReq.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        caReq.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(caReq.PublicKey, false));
        var notBefore = DateTimeOffset.UtcNow.AddMinutes(-5);
        using var ca = caReq.CreateSelfSigned(notBefore, notBefore.AddDays(days));
        written.Add(Write(dir, "ca.pem", ca.ExportCertificatePem()));
        written.Add(Write(dir, "ca.key", caKey.ExportPkcs8PrivateKeyPem(), secret: true));
        foreach (var host in hosts)
        {
            using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var subject = new X500DistinguishedNameBuilder();
            subject.AddCommonName(host.Name);
            var req = new CertificateRequest(subject.Build(), key, HashAlgorithmName.SHA256);
            var san = new SubjectAlternativeNameBuilder();
            foreach (string name in host.AllNames)
                if (IPAddress.TryParse(name, out var ip)) san.AddIpAddress(ip); else san.AddDnsName(name);
            req.CertificateExtensions.Add(san.Build());
            req.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
            req.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, true));
            // Each host is a TLS server (as destination) and a TLS client (as source).
            req.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")], false));
            byte[] serial = RandomNumberGenerator.GetBytes(16);
            serial[0] &= 0x7F;
            using var cert = req.Create(ca, notBefore, notBefore.AddDays(days), serial);
            written.Add(Write(dir, $"{host.Name}.pem", cert.ExportCertificatePem()));
            written.Add(Write(dir, $"{host.Name}.key", key.ExportPkcs8PrivateKeyPem(), secret: true));
        }
        return written;
    }

    /// <summary>The names a certificate carries for host-name checks: its DNS and IP subject alternative names, else its common name.</summary>
    public static IReadOnlyList<string> Names(X509Certificate2 cert)
    {
        var san = cert.Extensions.OfType<X509SubjectAlternativeNameExtension>().FirstOrDefault();
        if (san is null) return [cert.GetNameInfo(X509NameType.SimpleName, false)];
        return [.. san.EnumerateDnsNames(), .. san.EnumerateIPAddresses().Select(ip => ip.ToString())];
    }

    private static string Write(string dir, string name, string pem, bool secret = false)
    {
        string path = Path.Combine(dir, name);
        File.WriteAllText(path, pem + "\n");
        if (secret && !OperatingSystem.IsWindows()) File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        return path;
    }
}
