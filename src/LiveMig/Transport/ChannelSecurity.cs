using System.Buffers.Binary;
using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using LiveMig.Protocol;

namespace LiveMig.Transport;

/// <summary>Raised when a peer cannot be authenticated or the secure channel cannot be set up. The message says who and why.</summary>
public sealed class AuthenticationFailedException(string message, Exception? inner = null) : Exception(message, inner)
{
    /// <summary>What the peer is told of it (the local message may say more, e.g. the trust list).</summary>
    public string ToPeer { get; init; } = message;
}

/// <summary>
/// How a migration connection is protected. <see cref="None"/> is plain TCP (the CLI warns);
/// otherwise TLS 1.3 with mutual authentication, either by certificates from a CA both sides
/// trust (the destination also checks the source's name against its trust list) or by a
/// pre-shared key. .NET has no TLS-PSK cipher suites, so the PSK mode runs TLS 1.3 with
/// throw-away certificates and then has each side prove knowledge of the key with an HMAC
/// bound to the channel (the server certificate's hash, RFC 5929 tls-server-end-point, plus
/// both sides' nonces): a man in the middle terminates TLS with his own certificate, so the
/// bindings differ and the proofs fail.
/// </summary>
public sealed class ChannelSecurity
{
    private ChannelSecurity() { }

    public static ChannelSecurity None { get; } = new();

    /// <summary>A connection whose every byte is authenticated: the record layer after a TLS handshake (or an authenticated <see cref="System.Net.Security.SslStream"/>).</summary>
    public static bool IsSecured(Stream stream) => stream is AeadStream or SslStream { IsAuthenticated: true } || stream is ReplayStream r && IsSecured(r.Connection);

    public bool Enabled => Certificate is not null;
    public X509Certificate2? Certificate { get; private init; }
    public X509Certificate2Collection? TrustedRoots { get; private init; }
    /// <summary>Destination only: the source names accepted (certificate mode); null accepts any name the CA signed.</summary>
    public IReadOnlyCollection<string>? TrustedPeers { get; private init; }
    public byte[]? PreSharedKey { get; private init; }

    /// <summary>For reports: <c>none</c>, <c>tls13-certificates</c> or <c>tls13-psk</c>.</summary>
    public string Mode => !Enabled ? "none" : PreSharedKey is null ? "tls13-certificates" : "tls13-psk";

    /// <summary>Certificate mode: this host's certificate and key (PEM) and the CA that signs its peers.</summary>
    public static ChannelSecurity FromCertificates(string certPem, string keyPem, string caPem, IReadOnlyCollection<string>? trustedPeers = null)
    {
        X509Certificate2 cert;
        try
        {
            using var loaded = X509Certificate2.CreateFromPemFile(certPem, keyPem);
            // Round-trip through PKCS#12: SslStream on Linux needs a key it can hand to OpenSSL.
            cert = X509CertificateLoader.LoadPkcs12(loaded.Export(X509ContentType.Pkcs12), null);
        }
        catch (Exception e) when (e is CryptographicException or IOException or UnauthorizedAccessException)
        {
            throw new AuthenticationFailedException($"cannot load certificate {certPem} with key {keyPem}: {e.Message}", e);
        }
        var roots = new X509Certificate2Collection();
        try { roots.ImportFromPemFile(caPem); }
        catch (Exception e) when (e is CryptographicException or IOException or UnauthorizedAccessException)
        {
            throw new AuthenticationFailedException($"cannot load CA certificate {caPem}: {e.Message}", e);
        }
        if (roots.Count == 0) throw new AuthenticationFailedException($"{caPem} holds no certificate");
        return new ChannelSecurity { Certificate = cert, TrustedRoots = roots, TrustedPeers = trustedPeers };
    }

    /// <summary>Pre-shared-key mode: the key file's bytes (at least 16) are the secret.</summary>
    public static ChannelSecurity FromPreSharedKey(string keyFile)
    {
        byte[] key;
        try { key = File.ReadAllBytes(keyFile); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new AuthenticationFailedException($"cannot read pre-shared key {keyFile}: {e.Message}", e); }
        return FromPreSharedKey(key);
    }

    public static ChannelSecurity FromPreSharedKey(byte[] key)
    {
        if (key.Length < 16) throw new AuthenticationFailedException($"pre-shared key has {key.Length} bytes; at least 16 are needed");
        return new ChannelSecurity { Certificate = Certificates.SelfSigned("livemig-psk"), PreSharedKey = key };
    }

    /// <summary>
    /// Source side: secures a connected stream to a destination whose certificate must name
    /// <paramref name="targetHost"/> (the host connected to, or <c>--tls-hostname</c>); returns the stream to use.
    /// </summary>
    public Stream SecureClient(Stream inner, string targetHost, TimeSpan timeout)
    {
        if (!Enabled) return inner;
        var watched = new FirstBytes(inner);
        var ssl = new SslStream(watched, leaveInnerStreamOpen: false);
        string? problem = null;
        var options = new SslClientAuthenticationOptions
        {
            TargetHost = PreSharedKey is null ? targetHost : "livemig-psk",
            EnabledSslProtocols = SslProtocols.Tls13,
            ClientCertificates = [Certificate!],
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            RemoteCertificateValidationCallback = (_, cert, _, errors) =>
            {
                if (PreSharedKey is not null) return true; // authenticated below by the PSK proof
                problem = CheckChain(cert, errors, requireName: targetHost, role: "destination");
                return problem is null;
            },
        };
        // A destination without TLS answers a ClientHello with a plain Error frame: say that, not what TLS made of it.
        string? Why() => problem ?? (watched.StartsWithFrameMagic ? $"the destination does not use TLS: it answered in plain LiveMig frames (--tls on this side only; start listen with --tls too, or migrate without it)" : null);
        using (var deadline = new CancellationTokenSource(timeout))
            Authenticate(ssl, () => ssl.AuthenticateAsClientAsync(options, deadline.Token), deadline.Token, timeout, Why, $"destination {targetHost}").GetAwaiter().GetResult();
        if (PreSharedKey is not null) ProvePsk(ssl, client: true, CancellationToken.None).GetAwaiter().GetResult();
        using var exchange = new CancellationTokenSource(timeout);
        return SwitchToRecords(ssl, inner, client: true, exchange.Token, $"destination {targetHost}").GetAwaiter().GetResult();
    }

    /// <summary>
    /// The last step of securing a connection: each side sends 32 random bytes through TLS,
    /// strictly in turn (the source first, as it speaks first on every connection), and both go
    /// on in <see cref="AeadStream"/> records on the socket itself. In turn matters: neither side
    /// sends a record until it has read the other's last TLS bytes, so no SslStream can have read
    /// record bytes ahead into its own buffer.
    /// </summary>
    private async Task<Stream> SwitchToRecords(SslStream ssl, Stream socket, bool client, CancellationToken cancel, string who)
    {
        byte[] mine = RandomNumberGenerator.GetBytes(DataKeys.SecretSize), theirs = new byte[DataKeys.SecretSize];
        try
        {
            if (client) { await ssl.WriteAsync(mine, cancel); await ssl.FlushAsync(cancel); await ssl.ReadExactlyAsync(theirs, cancel); }
            else { await ssl.ReadExactlyAsync(theirs, cancel); await ssl.WriteAsync(mine, cancel); await ssl.FlushAsync(cancel); }
        }
        catch (Exception e) when (e is IOException or OperationCanceledException)
        {
            ssl.Dispose();
            throw new AuthenticationFailedException($"TLS with the {who} failed while agreeing on the data keys: {(e is OperationCanceledException ? "timed out" : e.Message)}", e);
        }
        byte[] binding = SHA256.HashData(client ? ssl.RemoteCertificate!.GetRawCertData() : Certificate!.RawData);
        var keys = DataKeys.Derive(client ? mine : theirs, client ? theirs : mine, binding, PreSharedKey ?? []);
        return new AeadStream(socket, keys, client, owner: ssl);
    }

    /// <summary>
    /// What a destination's TLS handshake gave: the secured stream, the authenticated source's
    /// name, or — the source completed TLS but is not accepted (no certificate, not signed by the
    /// CA, not in the trust list) — why, which the listener tells the source over the secured
    /// connection before closing it, rather than leaving it to guess from a closed connection.
    /// </summary>
    public readonly record struct ServerChannel(Stream Stream, string? Peer, AuthenticationFailedException? Refusal);

    /// <summary>Destination side, on no thread of its own: secures an accepted stream within <paramref name="cancel"/>'s deadline.</summary>
    public async Task<ServerChannel> SecureServerAsync(Stream inner, TimeSpan timeout, CancellationToken cancel)
    {
        if (!Enabled) return new ServerChannel(inner, null, null);
        var ssl = new SslStream(inner, leaveInnerStreamOpen: false);
        AuthenticationFailedException? refusal = null;
        string? name = null;
        var options = new SslServerAuthenticationOptions
        {
            ServerCertificate = Certificate,
            EnabledSslProtocols = SslProtocols.Tls13,
            ClientCertificateRequired = true,
            CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
            RemoteCertificateValidationCallback = (_, cert, _, errors) =>
            {
                if (PreSharedKey is not null) return cert is not null;
                // The channel is completed either way, so that a refused source can be told why; it is never read from.
                refusal = Refuse(cert, errors, out name);
                return true;
            },
        };
        await Authenticate(ssl, () => ssl.AuthenticateAsServerAsync(options, cancel), cancel, timeout, () => null, "source");
        if (PreSharedKey is not null) { await ProvePsk(ssl, client: false, cancel); name = "psk"; }
        var records = await SwitchToRecords(ssl, inner, client: false, cancel, "source");
        return new ServerChannel(records, refusal is null ? name : null, refusal);
    }

    /// <summary>Why a source's certificate is not accepted (the peer is told the first part; the local log also gets the trust list), or null; its name when it is.</summary>
    private AuthenticationFailedException? Refuse(X509Certificate? cert, SslPolicyErrors errors, out string? name)
    {
        name = null;
        if (CheckChain(cert, errors, requireName: null, role: "source") is { } problem) return new AuthenticationFailedException(problem);
        name = PeerText.Escape((cert as X509Certificate2 ?? new X509Certificate2(cert!)).GetNameInfo(X509NameType.SimpleName, false));
        if (TrustedPeers is null || TrustedPeers.Contains(name, StringComparer.OrdinalIgnoreCase)) return null;
        string told = $"source '{name}' is not in this destination's trust list";
        return new AuthenticationFailedException($"{told} ({string.Join(", ", TrustedPeers)})") { ToPeer = told };
    }

    private static async Task Authenticate(SslStream ssl, Func<Task> handshake, CancellationToken cancel, TimeSpan timeout, Func<string?> problem, string who)
    {
        try { await handshake(); }
        catch (OperationCanceledException e) when (cancel.IsCancellationRequested)
        {
            ssl.Dispose();
            throw new AuthenticationFailedException($"TLS handshake with the {who} timed out after {timeout.TotalSeconds:0.#} s", e);
        }
        catch (Exception e) when (e is AuthenticationException or IOException)
        {
            ssl.Dispose();
            throw new AuthenticationFailedException($"TLS with the {who} failed: {problem() ?? e.Message}", e);
        }
    }

    private string? CheckChain(X509Certificate? cert, SslPolicyErrors errors, string? requireName, string role)
    {
        if (cert is null) return $"the {role} sent no certificate";
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(TrustedRoots!);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        var c2 = cert as X509Certificate2 ?? new X509Certificate2(cert);
        string subject = PeerText.Escape(c2.Subject); // the peer's words until the chain is checked
        if (!chain.Build(c2))
            return $"the {role}'s certificate '{subject}' is not signed by the trusted CA ({string.Join("; ", chain.ChainStatus.Select(s => s.StatusInformation.Trim()))})";
        if (requireName is not null && !c2.MatchesHostname(requireName))
            return $"the {role}'s certificate '{subject}' does not name '{requireName}' (it names {string.Join(", ", Certificates.Names(c2).Select(PeerText.Escape))}): connect by one of those names, or give one with --tls-hostname";
        _ = errors; // chain and name are checked above against our own CA, not the system store
        return null;
    }

    /// <summary>Records the first bytes the destination sends, to tell a plain LiveMig answer from a broken TLS one.</summary>
    private sealed class FirstBytes(Stream inner) : DelegatingStream(inner)
    {
        private readonly byte[] _first = new byte[4];
        private int _seen;

        public bool StartsWithFrameMagic => _seen == 4 && BinaryPrimitives.ReadUInt32LittleEndian(_first) == FrameFormat.Magic;

        public override int Read(Span<byte> buffer)
        {
            int n = Inner.Read(buffer);
            int take = Math.Min(n, _first.Length - _seen);
            if (take > 0) { buffer[..take].CopyTo(_first.AsSpan(_seen)); _seen += take; }
            return n;
        }
    }

    private const int NonceSize = 32;

    /// <summary>Both sides send a nonce, then HMAC(psk, label | role | server-cert hash | client nonce | server nonce); each checks the other's.</summary>
    private async Task ProvePsk(SslStream ssl, bool client, CancellationToken cancel)
    {
        // The server's certificate as each side sees it: its own on the server, the one received on the client.
        byte[] binding = SHA256.HashData(client ? ssl.RemoteCertificate!.GetRawCertData() : Certificate!.RawData);
        byte[] mine = RandomNumberGenerator.GetBytes(NonceSize);
        byte[] theirs = new byte[NonceSize];
        await ssl.WriteAsync(mine, cancel);
        await ssl.FlushAsync(cancel);
        await ssl.ReadExactlyAsync(theirs, cancel);
        byte[] cNonce = client ? mine : theirs, sNonce = client ? theirs : mine;
        byte[] myProof = Proof(client ? "client" : "server", binding, cNonce, sNonce);
        byte[] expected = Proof(client ? "server" : "client", binding, cNonce, sNonce);
        await ssl.WriteAsync(myProof, cancel);
        await ssl.FlushAsync(cancel);
        byte[] got = new byte[expected.Length];
        try { await ssl.ReadExactlyAsync(got, cancel); }
        catch (EndOfStreamException) { throw new AuthenticationFailedException($"the {(client ? "destination" : "source")} closed the connection during the pre-shared-key check (different key?)"); }
        if (!CryptographicOperations.FixedTimeEquals(got, expected))
            throw new AuthenticationFailedException($"the {(client ? "destination" : "source")} does not know the pre-shared key");
    }

    private byte[] Proof(string role, byte[] binding, ReadOnlySpan<byte> cNonce, ReadOnlySpan<byte> sNonce)
    {
        using var h = IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, PreSharedKey!);
        h.AppendData("livemig-psk-v1"u8);
        h.AppendData(System.Text.Encoding.ASCII.GetBytes(role));
        h.AppendData(binding);
        h.AppendData(cNonce);
        h.AppendData(sNonce);
        return h.GetHashAndReset();
    }
}
