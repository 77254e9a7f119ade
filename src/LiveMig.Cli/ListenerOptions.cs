using System.CommandLine;
using LiveMig.Engine;

namespace LiveMig.Cli;

/// <summary><c>listen</c>'s bounds on what peers may claim: the memory budget and the handshake's limits.</summary>
internal sealed class ListenerOptions
{
    public readonly Option<string?> MemoryBudget = new("--memory-budget") { Description = "Memory all incoming VMs together may claim; each Hello reserves its VM's size, given back when the migration fails or the VM leaves; a Hello beyond it is refused (default: this machine's memory less an eighth, at least 1 GiB).", HelpName = "SIZE" };
    public readonly Option<string> HandshakeTimeout = new("--handshake-timeout") { Description = "Drop a connection whose handshake (TLS and its first frame) is not done within this; sources send their handshake without waiting for --bandwidth.", DefaultValueFactory = _ => "10s", HelpName = "TIME" };
    public readonly Option<int> MaxHandshakes = new("--max-handshakes") { Description = "Most connections in their handshake at once; more are closed at once and counted.", DefaultValueFactory = _ => 128, HelpName = "N" };

    /// <summary>The memory budget and the per-VM cap (<c>--max-memory</c>, default: the budget, as a larger VM could never fit).</summary>
    public (Engine.MemoryBudget Budget, long MaxVmBytes) Memory(ParseResult r, string? maxMemory)
    {
        long budget = Engine.MemoryBudget.DefaultBytes;
        string? text = r.GetValue(MemoryBudget);
        if (text is not null && (!Units.TryParseBytes(text, out budget) || budget <= 0)) throw new UsageException($"--memory-budget '{text}': expected a size such as 16GiB");
        long max = Math.Min(budget, MachineMemory.TotalBytes);
        if (maxMemory is not null && (!Units.TryParseBytes(maxMemory, out max) || max <= 0)) throw new UsageException($"--max-memory '{maxMemory}': expected a size such as 8GiB");
        if (max > budget) throw new UsageException($"--max-memory {maxMemory}: larger than the memory budget ({Units.Bytes(budget)}; --memory-budget)");
        return (new Engine.MemoryBudget(budget), max);
    }

    public DestinationOptions Apply(ParseResult r, DestinationOptions d)
    {
        string t = r.GetValue(HandshakeTimeout)!;
        if (!Units.TryParseDuration(t, out var timeout) || timeout <= TimeSpan.Zero || timeout > TimeSpan.FromHours(1))
            throw new UsageException($"--handshake-timeout '{t}': expected a positive duration such as 10s (at most 1h)");
        int n = r.GetValue(MaxHandshakes);
        if (n is < 1 or > 100_000) throw new UsageException($"--max-handshakes {n}: must be between 1 and 100000");
        return d with { HandshakeTimeout = timeout, MaxHandshakes = n };
    }
}

/// <summary><c>certs</c>' host list: <c>--hosts A,B</c> (one name each) and <c>--host NAME=ALIAS,...</c> (several names in one certificate).</summary>
internal static class CertificateHosts
{
    public static IReadOnlyList<Transport.Certificates.HostIdentity> Parse(string? hosts, IEnumerable<string> host)
    {
        var all = new List<Transport.Certificates.HostIdentity>();
        foreach (string h in Split(hosts ?? ""))
            all.Add(new(Checked(h, "--hosts", hosts!), []));
        foreach (string spec in host)
        {
            int eq = spec.IndexOf('=');
            string name = Checked(eq < 0 ? spec.Trim() : spec[..eq].Trim(), "--host", spec);
            all.Add(new(name, [.. Split(eq < 0 ? "" : spec[(eq + 1)..]).Select(a => Checked(a, "--host", spec))]));
        }
        if (all.Count == 0) throw new UsageException("certs: give the hosts to make certificates for, with --hosts A,B or --host NAME=ALIAS,...");
        var twice = all.GroupBy(h => h.Name, StringComparer.OrdinalIgnoreCase).FirstOrDefault(g => g.Count() > 1);
        if (twice is not null) throw new UsageException($"certs: '{twice.Key}' is named twice (its files would overwrite each other)");
        return all;
    }

    private static string[] Split(string list) => list.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>A host name or IP address that can also name a file.</summary>
    private static string Checked(string name, string option, string given)
    {
        bool ok = name.Length is > 0 and <= 253 && !name.StartsWith('.') && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '.' or '-' or ':' or '_');
        return ok ? name : throw new UsageException($"{option} '{given}': '{name}' is not a host name or IP address (letters, digits, '.', '-', ':')");
    }
}
