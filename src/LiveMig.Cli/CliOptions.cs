using System.CommandLine;
using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Cli;

/// <summary>A bad option: printed as one line naming the option, exit code 2.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>The options shared by the commands, their help texts, and their checks.</summary>
internal sealed class CliOptions
{
    public readonly Option<string> Memory = new("--memory") { Description = "Guest memory size, e.g. 512MiB, 4GiB (64MiB to the machine's memory).", DefaultValueFactory = _ => "1GiB", HelpName = "SIZE" };
    public readonly Option<int> Vcpus = new("--vcpus") { Description = "Number of vCPU threads running the workload.", DefaultValueFactory = _ => 2, HelpName = "N" };
    public readonly Option<string> Workload = new("--workload") { Description = "What the guest runs: NAME[:key=value,...]. idle; sweep[:rate=,range=]; random[:rate=,range=]; hotcold[:wss=,skew=,rate=]; kv[:keys=,value=]. Rates are page writes/s.", DefaultValueFactory = _ => "hotcold", HelpName = "SPEC" };
    public readonly Option<ulong> Seed = new("--seed") { Description = "Seed for the memory fill and the workload: the same seed gives the same guest.", DefaultValueFactory = _ => 1UL };
    public readonly Option<string> Fill = new("--fill") { Description = "Initial memory content: zero (sparse), random (incompressible), mixed (35% zero, 25% random, 40% text).", DefaultValueFactory = _ => "mixed", HelpName = "KIND" };
    public readonly Option<string> DirtyLog = new("--dirty-log") { Description = "Dirty tracking: auto (kernel userfaultfd write-protect if available), kernel, software.", DefaultValueFactory = _ => "auto", HelpName = "KIND" };
    public readonly Option<string> Bandwidth = new("--bandwidth") { Description = "Cap on migration traffic, e.g. 100MiB/s, 1Gbit; 'unlimited' for none.", DefaultValueFactory = _ => "unlimited", HelpName = "RATE" };
    public readonly Option<string> DowntimeLimit = new("--downtime-limit") { Description = "Stop iterating once the remaining dirty pages would take at most this long to send.", DefaultValueFactory = _ => "300ms", HelpName = "TIME" };
    public readonly Option<int> MaxRounds = new("--max-rounds") { Description = "Most pre-copy rounds (round 0 included) before stop-and-copy.", DefaultValueFactory = _ => 30, HelpName = "N" };
    public readonly Option<string> Strategy = new("--strategy") { Description = "Migration model: precopy (iterate, then stop and copy); postcopy (move the vCPUs first, resume on the destination at once, fetch pages on demand while pushing the rest); hybrid (pre-copy rounds within a budget, then post-copy).", DefaultValueFactory = _ => "precopy", HelpName = "NAME" };
    public readonly Option<string> HybridBudget = new("--hybrid-budget") { Description = "When hybrid switches to post-copy: rounds=N (default 5), time=DURATION, bytes=SIZE, comma-separated; it also switches as soon as the dirty set stops shrinking.", DefaultValueFactory = _ => "rounds=5", HelpName = "SPEC" };
    public readonly Option<string> DemandPaging = new("--demand-paging") { Description = "How the destination fetches missing pages in post-copy: auto (userfaultfd with the native helper when available, else portable), portable (present bitmap on the vCPU path), userfaultfd.", DefaultValueFactory = _ => "auto", HelpName = "MODE" };
    public readonly Option<bool> Verify = new("--verify") { Description = "Hash memory at pause (source) and before resume (destination); a mismatch fails the migration. On by default; --verify false to skip.", DefaultValueFactory = _ => true };
    public readonly Option<bool> Json = new("--json") { Description = "Print the report as one JSON object on stdout; no progress display." };
    public readonly Option<string> Warmup = new("--warmup") { Description = "How long the guest runs before the migration starts.", DefaultValueFactory = _ => "1s", HelpName = "TIME" };

    public readonly Option<bool> Tls = new("--tls") { Description = "Protect the connection with TLS 1.3 and mutual authentication: by certificates (--cert, --key, --ca) or by a pre-shared key (--psk-file). Without it LiveMig warns: memory crosses the network in the clear." };
    public readonly Option<string?> Cert = new("--cert") { Description = "This host's certificate (PEM), signed by the CA given with --ca ('livemig certs' makes a test set).", HelpName = "FILE" };
    public readonly Option<string?> Key = new("--key") { Description = "The private key (PEM) of --cert.", HelpName = "FILE" };
    public readonly Option<string?> Ca = new("--ca") { Description = "The CA certificate (PEM) the peer's certificate must be signed by.", HelpName = "FILE" };
    public readonly Option<string?> PskFile = new("--psk-file") { Description = "Authenticate with a pre-shared key instead of certificates: the file's bytes (at least 16) are the key; both sides use the same file.", HelpName = "FILE" };

    public void AddSecurityOptions(Command c)
    {
        c.Add(Tls); c.Add(Cert); c.Add(Key); c.Add(Ca); c.Add(PskFile);
    }

    /// <summary>The connection's protection from --tls and friends; warns on stderr when there is none.</summary>
    public Transport.ChannelSecurity Security(ParseResult r, IReadOnlyCollection<string>? trust = null)
    {
        string? cert = r.GetValue(Cert), key = r.GetValue(Key), ca = r.GetValue(Ca), psk = r.GetValue(PskFile);
        if (!r.GetValue(Tls))
        {
            if (cert is not null || key is not null || ca is not null || psk is not null) throw new UsageException("--cert/--key/--ca/--psk-file need --tls");
            if (trust is not null) throw new UsageException("--trust needs --tls with certificates");
            if (r.CommandResult.Command.Name != "demo") // loopback inside one process: nothing to protect
                Console.Error.WriteLine("livemig: warning: no --tls: guest memory crosses the network unencrypted and the peer is not authenticated");
            return Transport.ChannelSecurity.None;
        }
        try
        {
            if (psk is not null)
            {
                if (cert is not null || key is not null || ca is not null) throw new UsageException("--psk-file: use either a pre-shared key or --cert/--key/--ca, not both");
                if (trust is not null) throw new UsageException("--trust names certificate identities; it does not apply to --psk-file");
                return Transport.ChannelSecurity.FromPreSharedKey(psk);
            }
            if (cert is null || key is null || ca is null) throw new UsageException("--tls needs --cert, --key and --ca (or --psk-file)");
            return Transport.ChannelSecurity.FromCertificates(cert, key, ca, trust);
        }
        catch (Transport.AuthenticationFailedException e) { throw new UsageException("--tls: " + e.Message); }
    }

    public void AddVmOptions(Command c)
    {
        c.Add(Memory); c.Add(Vcpus); c.Add(Workload); c.Add(Seed); c.Add(Fill); c.Add(DirtyLog); c.Add(Warmup);
    }

    public void AddMigrationOptions(Command c)
    {
        c.Add(Strategy); c.Add(HybridBudget); c.Add(Bandwidth); c.Add(DowntimeLimit); c.Add(MaxRounds); c.Add(Verify); c.Add(Json);
        AddSecurityOptions(c);
    }

    public VmConfig VmConfig(ParseResult r, string name, long? maxMemory = null)
    {
        string memText = r.GetValue(Memory)!;
        if (!Units.TryParseBytes(memText, out long memory) || memory <= 0)
            throw new UsageException($"--memory '{memText}': expected a size such as 512MiB or 4GiB");
        long machine = maxMemory ?? MachineMemory.TotalBytes;
        if (memory < 64L << 20) throw new UsageException($"--memory {memText}: at least 64MiB");
        if (memory > machine) throw new UsageException($"--memory {memText}: larger than this machine's memory ({Units.Bytes(machine)})");
        if (memory % 4096 != 0) throw new UsageException($"--memory {memText}: must be a whole number of 4 KiB pages");
        int vcpus = r.GetValue(Vcpus);
        if (vcpus < 1 || vcpus > 256) throw new UsageException($"--vcpus {vcpus}: must be between 1 and 256");
        string workload = r.GetValue(Workload)!;
        try { _ = Workloads.Workload.Create(WorkloadSpec.Parse(workload), memory / 4096); }
        catch (FormatException e) { throw new UsageException($"--workload '{workload}': {e.Message}"); }
        string fill = r.GetValue(Fill)!;
        var fillKind = fill.ToLowerInvariant() switch
        {
            "zero" => MemoryFill.Zero, "random" => MemoryFill.Random, "mixed" => MemoryFill.Mixed,
            _ => throw new UsageException($"--fill '{fill}': expected zero, random or mixed"),
        };
        return new VmConfig { Name = name, MemoryBytes = memory, Vcpus = vcpus, Workload = workload, Seed = r.GetValue(Seed), Fill = fillKind, DirtyLog = ParseDirtyLog(r.GetValue(DirtyLog)!) };
    }

    public static DirtyLogKind ParseDirtyLog(string text) => text.ToLowerInvariant() switch
    {
        "auto" => DirtyLogKind.Auto, "kernel" => DirtyLogKind.Kernel, "software" => DirtyLogKind.Software,
        _ => throw new UsageException($"--dirty-log '{text}': expected auto, kernel or software"),
    };

    public MigrationOptions MigrationOptions(ParseResult r)
    {
        string strategy = r.GetValue(Strategy)!;
        var kind = strategy.ToLowerInvariant() switch
        {
            "precopy" => MigrationStrategy.PreCopy, "postcopy" => MigrationStrategy.PostCopy, "hybrid" => MigrationStrategy.Hybrid,
            _ => throw new UsageException($"--strategy '{strategy}': expected precopy, postcopy or hybrid"),
        };
        string bw = r.GetValue(Bandwidth)!;
        if (!Units.TryParseRate(bw, out long rate)) throw new UsageException($"--bandwidth '{bw}': expected a rate such as 100MiB/s or 1Gbit, or unlimited");
        string dl = r.GetValue(DowntimeLimit)!;
        if (!Units.TryParseDuration(dl, out var downtime) || downtime <= TimeSpan.Zero) throw new UsageException($"--downtime-limit '{dl}': expected a positive duration such as 300ms");
        int rounds = r.GetValue(MaxRounds);
        if (rounds < 1 || rounds > 10_000) throw new UsageException($"--max-rounds {rounds}: must be between 1 and 10000");
        return new MigrationOptions
        {
            Security = Security(r),
            BandwidthLimit = rate,
            Verify = r.GetValue(Verify),
            PreCopy = new PreCopyOptions { DowntimeLimit = downtime, MaxRounds = rounds },
            Strategy = kind,
            PostCopy = new PostCopyOptions { Hybrid = ParseHybridBudget(r.GetValue(HybridBudget)!) },
        };
    }

    public static HybridOptions ParseHybridBudget(string text)
    {
        var o = new HybridOptions();
        foreach (string part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            int eq = part.IndexOf('=');
            string key = eq < 0 ? part : part[..eq], value = eq < 0 ? "" : part[(eq + 1)..];
            switch (key.ToLowerInvariant())
            {
                case "rounds" when int.TryParse(value, out int n) && n is >= 0 and <= 10_000: o = o with { MaxRounds = n }; break;
                case "time" when Units.TryParseDuration(value, out var t) && t > TimeSpan.Zero: o = o with { TimeBudget = t }; break;
                case "bytes" when Units.TryParseBytes(value, out long b) && b > 0: o = o with { ByteBudget = b }; break;
                default: throw new UsageException($"--hybrid-budget '{text}': expected rounds=N, time=DURATION, bytes=SIZE (comma-separated)");
            }
        }
        return o;
    }

    public static DemandPagingMode ParseDemandPaging(string text) => text.ToLowerInvariant() switch
    {
        "auto" => DemandPagingMode.Auto, "portable" => DemandPagingMode.Portable, "userfaultfd" or "uffd" => DemandPagingMode.Userfaultfd,
        _ => throw new UsageException($"--demand-paging '{text}': expected auto, portable or userfaultfd"),
    };

    public TimeSpan WarmupTime(ParseResult r)
    {
        string w = r.GetValue(Warmup)!;
        if (!Units.TryParseDuration(w, out var t) || t > TimeSpan.FromHours(1)) throw new UsageException($"--warmup '{w}': expected a duration such as 1s (at most 1h)");
        return t;
    }
}
