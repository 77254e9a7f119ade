using System.CommandLine;
using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Protocol;
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
    public readonly Option<string> Workload = new("--workload") { Description = "What the guest runs: NAME[:key=value,...]. idle[:used=]; sweep[:rate=,range=]; random[:rate=,range=]; hotcold[:wss=,skew=,rate=]; kv[:keys=,value=]; trace:FILE[,speed=] (replays a recorded trace). Rates are page writes/s.", DefaultValueFactory = _ => "hotcold", HelpName = "SPEC" };
    public readonly Option<ulong> Seed = new("--seed") { Description = "Seed for the memory fill and the workload: the same seed gives the same guest.", DefaultValueFactory = _ => 1UL };
    public readonly Option<string> Fill = new("--fill") { Description = "Initial memory content: zero (sparse), random (incompressible), mixed (35% zero, 25% random, 40% text).", DefaultValueFactory = _ => "mixed", HelpName = "KIND" };
    public readonly Option<string> DirtyLog = new("--dirty-log") { Description = "Dirty tracking: auto (kernel userfaultfd write-protect if available), kernel, software.", DefaultValueFactory = _ => "auto", HelpName = "KIND" };
    public readonly Option<string> Bandwidth = new("--bandwidth") { Description = "Cap on migration traffic, e.g. 100MiB/s, 1Gbit; 'unlimited' for none.", DefaultValueFactory = _ => "unlimited", HelpName = "RATE" };
    public readonly Option<string> DowntimeLimit = new("--downtime-limit") { Description = "Stop iterating once the remaining dirty pages, at their measured cost on the wire, and the switch-over's round trips would take at most this long (hybrid: switch to post-copy then). Not with postcopy.", DefaultValueFactory = _ => "300ms", HelpName = "TIME" };
    public readonly Option<string> OnStall = new("--on-stall") { Description = "When the rounds stop converging before the downtime target is met: abort (the migration fails, the VM keeps running here, unslowed), throttle (auto-converge, and --dirty-limit if given, until it converges; abort once no brake is left), postcopy (switch to post-copy, as hybrid does), pause (pause anyway, up to --max-downtime). Pre-copy only.", DefaultValueFactory = _ => "abort", HelpName = "ACTION" };
    public readonly Option<string?> MaxDowntime = new("--max-downtime") { Description = "With --on-stall pause: the longest pause accepted when the rounds stall (the report says by how much the target was exceeded).", HelpName = "TIME" };
    public readonly Option<string?> Timeout = new("--timeout") { Description = "Bounds the pre-copy rounds: once they have run this long the migration ends as if they had stalled (or stops and copies, if the rest fits the downtime limit; hybrid switches to post-copy).", HelpName = "TIME" };
    public readonly Option<int> MaxRounds = new("--max-rounds") { Description = "Most pre-copy rounds (round 0 included) before stop-and-copy.", DefaultValueFactory = _ => 30, HelpName = "N" };
    public readonly Option<string> Strategy = new("--strategy") { Description = "Migration model: precopy (iterate, then stop and copy); postcopy (move the vCPUs first, resume on the destination at once, fetch pages on demand while pushing the rest); hybrid (pre-copy rounds within a budget, then post-copy).", DefaultValueFactory = _ => "precopy", HelpName = "NAME" };
    public readonly Option<string> HybridBudget = new("--hybrid-budget") { Description = "When hybrid switches to post-copy: rounds=N (default 5), time=DURATION, bytes=SIZE, comma-separated; it also switches wherever pre-copy would stop (downtime target met, rounds not converging, --max-rounds, --predictive-stop). Hybrid only.", DefaultValueFactory = _ => "rounds=5", HelpName = "SPEC" };
    public readonly Option<string> DemandPaging = new("--demand-paging") { Description = "How the destination fetches missing pages in post-copy: auto (userfaultfd where available, else portable with a note), portable (present bitmap on the vCPU path), userfaultfd (kernel faults served by the native helper; fails when unavailable). Built-in VM only: a QEMU guest's faults are always caught in QEMU by userfaultfd.", DefaultValueFactory = _ => "auto", HelpName = "MODE" };
    public readonly Option<bool> Verify = new("--verify") { Description = "Hash memory at pause (source) and before resume (destination); a mismatch fails the migration. On by default; --verify false to skip.", DefaultValueFactory = _ => true };
    public readonly Option<bool> Json = new("--json") { Description = "Print the report as one JSON object on stdout; no progress display." };
    public readonly Option<bool> DeferHotPages = new("--defer-hot-pages") { Description = "Keep the writable working set (pages re-dirtied in 2 of the last 3 rounds) for the stop-and-copy instead of re-sending it every round, at most what the downtime limit can carry; with the software dirty log, also skip pages written again since they were harvested." };
    public readonly Option<bool> PredictiveStop = new("--predictive-stop") { Description = "Also stop iterating when the dirty-rate predictor says one more round would not cut the downtime by at least a tenth of that round's duration." };
    public readonly Option<string?> AutoConverge = new("--auto-converge") { Description = "Throttle the vCPUs when rounds do not converge: INITIAL percent at first, INCREMENT more each time they still do not, up to MAX (QEMU's cpu-throttle-initial/-increment). Without a value: 20,10,99.", Arity = ArgumentArity.ZeroOrOne, HelpName = "INITIAL,INCREMENT[,MAX]" };
    public readonly Option<string?> DirtyLimit = new("--dirty-limit") { Description = "When rounds do not converge, cap each vCPU at this many page writes per second (QEMU's dirty-limit); with --auto-converge the throttle steps follow if that is not enough.", HelpName = "PAGES_PER_S" };
    public readonly Option<string> Compress = new("--compress") { Description = "Page compression: none, lz4[:LEVEL] (0-12, 0 = fast), zstd[:LEVEL] (-5..19, default 3), or adaptive[:ZSTDLEVEL] (raw, LZ4 or Zstd per page from a content sample; none while the CPU rather than the link is the bottleneck). Pages that would not shrink by an eighth go raw.", DefaultValueFactory = _ => "none", HelpName = "MODE" };
    public readonly Option<string> XbzrleCache = new("--xbzrle-cache") { Description = "Send re-dirtied pages as XBZRLE deltas against a cache of pages already sent, of this size (e.g. 64MiB); 0 = off.", DefaultValueFactory = _ => "0", HelpName = "SIZE" };
    public readonly Option<bool> Dedup = new("--dedup") { Description = "Send a reference instead of content the destination already holds: a page identical to one sent earlier, or to one of another VM the destination received (xxHash3-128, verified there before use)." };
    public readonly Option<bool> SkipFreePages = new("--skip-free-pages") { Description = "Do not send pages the guest reports free (free-page hint; the destination keeps them zero). A free page written later is sent like any dirty page." };
    public readonly Option<string> Optimize = new("--optimize") { Description = $"Turn on optimisations by name: all, none, or a comma-separated list of {Optimizations.Names}. Explicit options override.", DefaultValueFactory = _ => "none", HelpName = "LIST" };
    public readonly Option<int> Streams = new("--streams") { Description = "Pre-copy: send pages on N parallel TCP connections (like QEMU's multifd; 1..16), each with its own encoder thread, besides the control connection; 1 = everything on one connection. Post-copy and hybrid use one.", DefaultValueFactory = _ => 1, HelpName = "N" };
    public readonly Option<string> Reconnect = new("--reconnect") { Description = "After the connection drops, keep reconnecting (bounded back-off) for this long and continue where the migration stopped: pre-copy resends only what the destination had not acknowledged (the VM keeps running here meanwhile); post-copy recovers its page stream. 0 = fail at the first drop.", DefaultValueFactory = _ => "30s", HelpName = "TIME" };
    public readonly Option<string?> MemoryFile = new("--memory-file") { Description = "Keep the guest's memory in this new file (e.g. /dev/shm/vm0.mem) instead of anonymous memory: it outlives this process, so if the source dies after a post-copy switch, 'livemig migrate --recover ID --memory-file PATH --to HOST:PORT' can still serve the destination the pages it lacks. Removed when the migration ends here.", HelpName = "PATH" };
    public readonly Option<string?> Name = new("--name") { Description = "The VM's name, unique on the destination agent (which refuses a name it already runs): letters, digits, '.', '_', '-', at most 63. Default: vm- and 8 random hex digits.", HelpName = "NAME" };
    public readonly Option<string?> Qemu = new("--qemu") { Description = "Run a QEMU guest booting this raw image (e.g. the boot-sector guest, guests/bootsector/build.sh) instead of the built-in VM, its RAM in a shared file LiveMig moves; --memory and --vcpus size it (--workload, --seed, --fill, --dirty-log and --memory-file are the built-in VM's). Pre-copy, post-copy and hybrid (post-copy: the destination catches QEMU's own faults with userfaultfd, also over --tls); the destination agent needs 'listen --qemu-allow' naming the image's directory. See docs/qemu.md.", HelpName = "IMAGE" };
    public readonly Option<string> QemuAccel = new("--qemu-accel") { Description = "With --qemu or --qemu-kernel: QEMU's accelerator, tcg (works everywhere) or kvm.", DefaultValueFactory = _ => "tcg", HelpName = "ACCEL" };
    public readonly Option<string?> QemuKernel = new("--qemu-kernel") { Description = "Run a QEMU guest booting this Linux kernel (QEMU's -kernel; e.g. the Linux guest, guests/linux/build.sh) instead of a boot image; otherwise as --qemu. The destination agent needs 'listen --qemu-allow' naming the directories of the kernel and its initramfs.", HelpName = "KERNEL" };
    public readonly Option<string?> QemuInitrd = new("--qemu-initrd") { Description = "With --qemu-kernel: its initramfs (QEMU's -initrd).", HelpName = "FILE" };
    public readonly Option<string> QemuAppend = new("--qemu-append") { Description = "With --qemu-kernel: the kernel's command line (QEMU's -append; printable ASCII, at most 512 characters).", DefaultValueFactory = _ => "console=ttyS0 quiet", HelpName = "TEXT" };
    public readonly Option<string?> QemuForward = new("--qemu-forward") { Description = "Give the QEMU guest a virtio-net card on QEMU's user networking and forward these guest TCP ports (comma-separated, e.g. 6379) from ports of 127.0.0.1 each host picks for itself (the kernel's choice; printed when the guest starts here and when it arrives at an agent): a source never chooses the destination's host ports.", HelpName = "PORTS" };
    public readonly Option<string> Warmup = new("--warmup") { Description = "How long the guest runs before the migration starts.", DefaultValueFactory = _ => "1s", HelpName = "TIME" };

    public readonly Option<bool> Tls = new("--tls") { Description = "Protect the connection with TLS 1.3 and mutual authentication: by certificates (--cert, --key, --ca) or by a pre-shared key (--psk-file). Without it LiveMig warns: memory crosses the network in the clear." };
    public readonly Option<string?> Cert = new("--cert") { Description = "This host's certificate (PEM), signed by the CA given with --ca ('livemig certs' makes a test set).", HelpName = "FILE" };
    public readonly Option<string?> Key = new("--key") { Description = "The private key (PEM) of --cert.", HelpName = "FILE" };
    public readonly Option<string?> Ca = new("--ca") { Description = "The CA certificate (PEM) the peer's certificate must be signed by.", HelpName = "FILE" };
    public readonly Option<string?> TlsHostname = new("--tls-hostname") { Description = "With --tls and certificates: the name the destination's certificate must carry (like QEMU's tls-hostname), when --to gives an IP address or another name. Default: the host in --to.", HelpName = "NAME" };
    public readonly Option<string?> PskFile = new("--psk-file") { Description = "Authenticate with a pre-shared key instead of certificates: the file's bytes (at least 16) are the key; both sides use the same file.", HelpName = "FILE" };

    public void AddSecurityOptions(Command c)
    {
        c.Add(Tls); c.Add(Cert); c.Add(Key); c.Add(Ca); c.Add(PskFile);
    }

    private readonly List<string> _warnings = [];

    /// <summary>
    /// Prints the warnings the checks found (e.g. no --tls), once every option has been checked:
    /// a command refused for a bad option prints its one line and nothing else.
    /// </summary>
    public void PrintWarnings(TextWriter to)
    {
        foreach (string w in _warnings) to.WriteLine($"livemig: warning: {w}");
        _warnings.Clear();
    }

    /// <summary>The connection's protection from --tls and friends; without it, a warning for <see cref="PrintWarnings"/>.</summary>
    public Transport.ChannelSecurity Security(ParseResult r, IReadOnlyCollection<string>? trust = null)
    {
        string? cert = r.GetValue(Cert), key = r.GetValue(Key), ca = r.GetValue(Ca), psk = r.GetValue(PskFile);
        if (!r.GetValue(Tls))
        {
            if (cert is not null || key is not null || ca is not null || psk is not null) throw new UsageException("--cert/--key/--ca/--psk-file need --tls");
            if (trust is not null) throw new UsageException("--trust needs --tls with certificates");
            if (r.CommandResult.Command.Name != "demo") // loopback inside one process: nothing to protect
                _warnings.Add("no --tls: guest memory crosses the network unencrypted and the peer is not authenticated");
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

    /// <summary>--tls-hostname: a name only a certificate can carry, so only with --tls and certificates.</summary>
    private string? ParseTlsHostname(ParseResult r)
    {
        string? name = r.GetValue(TlsHostname);
        if (name is null) return null;
        if (!r.GetValue(Tls) || r.GetValue(PskFile) is not null) throw new UsageException("--tls-hostname: only with --tls and certificates (--cert, --key, --ca): it names the destination's certificate");
        if (name.Length == 0 || name.Length > 253 || name.Any(c => char.IsWhiteSpace(c) || char.IsControl(c))) throw new UsageException($"--tls-hostname '{name}': expected a host name or IP address");
        return name;
    }

    public void AddVmOptions(Command c)
    {
        c.Add(Name); c.Add(Memory); c.Add(Vcpus); c.Add(Workload); c.Add(Seed); c.Add(Fill); c.Add(DirtyLog); c.Add(MemoryFile); c.Add(Warmup); c.Add(Qemu); c.Add(QemuAccel);
        c.Add(QemuKernel); c.Add(QemuInitrd); c.Add(QemuAppend); c.Add(QemuForward);
    }

    /// <summary>The options that make a VM here (none of them applies to a VM an agent already holds).</summary>
    public IEnumerable<Option> VmOptions => [Name, Memory, Vcpus, Workload, Seed, Fill, DirtyLog, MemoryFile, Warmup, Qemu, QemuAccel, QemuKernel, QemuInitrd, QemuAppend, QemuForward];

    /// <summary>The built-in VM's options, refused with --qemu.</summary>
    public IEnumerable<Option> BuiltInVmOptions => [Workload, Seed, Fill, DirtyLog, MemoryFile];

    public void AddMigrationOptions(Command c)
    {
        c.Add(Strategy); c.Add(HybridBudget); c.Add(Streams); c.Add(Bandwidth); c.Add(DowntimeLimit); c.Add(MaxRounds); c.Add(Verify); c.Add(Json);
        c.Add(DeferHotPages); c.Add(PredictiveStop); c.Add(AutoConverge); c.Add(DirtyLimit); c.Add(OnStall); c.Add(MaxDowntime); c.Add(Timeout); c.Add(Reconnect);
        AddSecurityOptions(c);
        c.Add(TlsHostname);
        c.Add(Optimize); c.Add(Compress); c.Add(XbzrleCache); c.Add(Dedup); c.Add(SkipFreePages);
    }

    public VmConfig VmConfig(ParseResult r, long? maxMemory = null)
    {
        string name = ParseName(r.GetValue(Name));
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
        string? file = r.GetValue(MemoryFile);
        if (file is not null && File.Exists(file)) throw new UsageException($"--memory-file {file}: exists already (it may hold a paused VM: recover it with --recover, or remove it)");
        return new VmConfig { Name = name, MemoryBytes = memory, Vcpus = vcpus, Workload = workload, Seed = r.GetValue(Seed), Fill = fillKind, DirtyLog = ParseDirtyLog(r.GetValue(DirtyLog)!), MemoryFile = file };
    }

    /// <summary>What a rate must look like (zero is refused in every unit: <c>unlimited</c> says "no cap").</summary>
    public const string RateExpected = "expected a rate above 0 such as 100MiB/s, 1Gbit or 500Mbit/s, or unlimited";

    /// <summary>A VM name as --name takes it (the default: vm- and 8 random hex digits, so two VMs started without one do not collide).</summary>
    public static string ParseName(string? text)
    {
        if (text is null) return $"vm-{Guid.NewGuid().ToString("N")[..8]}";
        if (!System.Text.RegularExpressions.Regex.IsMatch(text, "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"))
            throw new UsageException($"--name '{PeerText.Escape(text)}': expected letters, digits, '.', '_' or '-' (starting with a letter or digit, at most 63)");
        return text;
    }

    /// <summary>HOST:PORT (an IPv6 host in brackets).</summary>
    public static (string Host, int Port) ParseTarget(string target)
    {
        int colon = target.LastIndexOf(':');
        if (colon <= 0 || !int.TryParse(target[(colon + 1)..], out int port) || port is < 1 or > 65535)
            throw new UsageException($"--to '{PeerText.Escape(target)}': expected HOST:PORT");
        return (target[..colon].Trim('[', ']'), port);
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
        StrategyRules.Check(this, r, kind, strategy.ToLowerInvariant());
        string bw = r.GetValue(Bandwidth)!;
        if (!Units.TryParseRate(bw, out long rate)) throw new UsageException($"--bandwidth '{bw}': {RateExpected}");
        string dl = r.GetValue(DowntimeLimit)!;
        if (!Units.TryParseDuration(dl, out var downtime) || downtime <= TimeSpan.Zero) throw new UsageException($"--downtime-limit '{dl}': expected a positive duration such as 300ms");
        int rounds = r.GetValue(MaxRounds);
        if (rounds < 1 || rounds > 10_000) throw new UsageException($"--max-rounds {rounds}: must be between 1 and 10000");
        bool defer = r.GetValue(DeferHotPages);
        int streams = r.GetValue(Streams);
        if (streams < 1 || streams > Protocol.StreamLayout.MaxStreams) throw new UsageException($"--streams {streams}: must be between 1 and {Protocol.StreamLayout.MaxStreams}");
        if (streams > 1 && kind != MigrationStrategy.PreCopy) throw new UsageException($"--streams {streams}: not with --strategy {strategy.ToLowerInvariant()}: only pre-copy sends on several streams; {strategy.ToLowerInvariant()} uses one connection for pages (and one for page requests)");
        var (onStall, maxDowntime) = ParseStall(r, downtime);
        if (onStall == StallAction.PostCopy && streams > 1) throw new UsageException($"--streams {streams}: not with --on-stall postcopy: a migration that may switch to post-copy sends its pages on one connection");
        TimeSpan? timeout = ParseOptionalDuration(r.GetValue(Timeout), "--timeout");
        string rc = r.GetValue(Reconnect)!;
        if (!Units.TryParseDuration(rc, out var reconnect) || reconnect < TimeSpan.Zero || reconnect > TimeSpan.FromDays(1))
            throw new UsageException($"--reconnect '{rc}': expected a duration such as 30s (0 = no reconnecting, at most 1 day)");
        var options = new MigrationOptions
        {
            Streams = streams,
            ReconnectWindow = reconnect,
            Security = Security(r),
            TlsHostname = ParseTlsHostname(r),
            BandwidthLimit = rate,
            Verify = r.GetValue(Verify),
            PreCopy = new PreCopyOptions
            {
                DowntimeLimit = downtime,
                MaxRounds = rounds,
                DeferHotPages = defer,
                SkipRewrittenPages = defer,
                PredictiveStop = r.GetValue(PredictiveStop),
                AutoConverge = r.GetResult(AutoConverge) is null ? null : ParseAutoConverge(r.GetValue(AutoConverge)),
                DirtyLimit = ParseDirtyLimit(r.GetValue(DirtyLimit)),
                OnStall = onStall,
                MaxDowntime = maxDowntime,
                TimeBudget = timeout,
            },
            Strategy = kind,
            // Post-copy has no choice but to recover (neither side has the whole VM): a window of 0 there means give up at once.
            PostCopy = new PostCopyOptions { Hybrid = ParseHybridBudget(r.GetValue(HybridBudget)!), RecoveryTimeout = reconnect },
        };
        options = Optimizations.Apply(r.GetValue(Optimize)!, options, kind, strategy.ToLowerInvariant());
        return options with { Pipeline = ApplyPipelineOptions(r, options.Pipeline) };
    }

    private static bool Given(ParseResult r, Option o) => r.GetResult(o) is { Implicit: false };

    /// <summary>The pipeline after <c>--optimize</c>, with the explicit pipeline options on top.</summary>
    public PipelineOptions ApplyPipelineOptions(ParseResult r, PipelineOptions p)
    {
        if (Given(r, Compress)) p = ParseCompress(r.GetValue(Compress)!, p);
        if (Given(r, XbzrleCache))
        {
            string text = r.GetValue(XbzrleCache)!;
            long bytes = 0;
            if (text.Trim().ToLowerInvariant() is not ("off" or "none") && (!Units.TryParseBytes(text, out bytes) || bytes < 0))
                throw new UsageException($"--xbzrle-cache '{text}': expected a size such as 64MiB, or 0 for off");
            if (bytes > 0 && bytes < 4096) throw new UsageException($"--xbzrle-cache '{text}': at least one page (4KiB), or 0 for off");
            if (bytes > 1L << 40) throw new UsageException($"--xbzrle-cache '{text}': at most 1TiB");
            p = p with { XbzrleCacheBytes = bytes };
        }
        if (Given(r, Dedup)) p = p with { Dedup = r.GetValue(Dedup) };
        if (Given(r, SkipFreePages)) p = p with { SkipFreePages = r.GetValue(SkipFreePages) };
        return p;
    }

    public static PipelineOptions ParseCompress(string text, PipelineOptions p)
    {
        string s = text.Trim().ToLowerInvariant();
        int colon = s.IndexOf(':');
        string name = colon < 0 ? s : s[..colon];
        int? level = null;
        if (colon >= 0)
        {
            if (!int.TryParse(s[(colon + 1)..], System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out int l))
                throw new UsageException($"--compress '{text}': level '{s[(colon + 1)..]}' is not a whole number");
            level = l;
        }
        var kind = name switch
        {
            "none" or "off" => CompressionKind.None,
            "lz4" => CompressionKind.Lz4,
            "zstd" => CompressionKind.Zstd,
            "adaptive" => CompressionKind.Adaptive,
            _ => throw new UsageException($"--compress '{text}': expected none, lz4[:LEVEL], zstd[:LEVEL] or adaptive"),
        };
        if (kind == CompressionKind.None && level is not null) throw new UsageException($"--compress '{text}': none takes no level");
        var result = p with { Compression = kind, CompressionLevel = level };
        try { result.Validate(); }
        catch (ArgumentException e) { throw new UsageException($"--compress '{text}': {e.Message}"); }
        return result;
    }

    /// <summary>"INITIAL,INCREMENT[,MAX]" in percent (a trailing % is allowed); null or empty: QEMU's 20,10,99.</summary>
    public static AutoConvergeOptions ParseAutoConverge(string? text)
    {
        var defaults = new AutoConvergeOptions();
        if (string.IsNullOrWhiteSpace(text)) return defaults;
        string[] parts = text.Split(',', StringSplitOptions.TrimEntries);
        string Bad(string why) => throw new UsageException($"--auto-converge '{text}': {why}");
        if (parts.Length is < 2 or > 3) Bad("expected INITIAL,INCREMENT[,MAX] in percent, e.g. 20,10 or 20,10,99");
        double[] v = new double[parts.Length];
        for (int i = 0; i < parts.Length; i++)
            if (!double.TryParse(parts[i].TrimEnd('%'), System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out v[i]) || !double.IsFinite(v[i]))
                Bad($"'{parts[i]}' is not a percentage");
        double max = parts.Length == 3 ? v[2] : 99;
        if (v[0] is <= 0 or > 99) Bad("INITIAL must be more than 0 and at most 99 percent");
        if (v[1] is < 0 or > 99) Bad("INCREMENT must be 0 to 99 percent");
        if (max < v[0] || max > 99) Bad("MAX must be between INITIAL and 99 percent");
        return defaults with { Initial = v[0] / 100, Increment = v[1] / 100, Max = max / 100 };
    }

    /// <summary>Page writes per second per vCPU; null: none.</summary>
    public static double ParseDirtyLimit(string? text)
    {
        if (text is null) return 0;
        if (!double.TryParse(text, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double v) || !double.IsFinite(v) || v <= 0 || v > 1e9)
            throw new UsageException($"--dirty-limit '{text}': expected page writes per second per vCPU, a number above 0, e.g. 2000");
        return v;
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

    /// <summary>--on-stall and --max-downtime, checked together: a maximum goes with pause, and pause needs one.</summary>
    private (StallAction, TimeSpan?) ParseStall(ParseResult r, TimeSpan downtimeLimit)
    {
        string text = r.GetValue(OnStall)!;
        var action = text.Trim().ToLowerInvariant() switch
        {
            "abort" => StallAction.Abort, "throttle" => StallAction.Throttle, "postcopy" => StallAction.PostCopy, "pause" => StallAction.Pause,
            _ => throw new UsageException($"--on-stall '{text}': expected abort, throttle, postcopy or pause"),
        };
        TimeSpan? max = ParseOptionalDuration(r.GetValue(MaxDowntime), "--max-downtime");
        if (max is not null && action != StallAction.Pause) throw new UsageException("--max-downtime: only with --on-stall pause (the longest pause it accepts)");
        if (action == StallAction.Pause && max is null) throw new UsageException("--on-stall pause: give the longest pause accepted with --max-downtime TIME");
        if (max < downtimeLimit) throw new UsageException($"--max-downtime {r.GetValue(MaxDowntime)}: shorter than --downtime-limit ({downtimeLimit.TotalMilliseconds:0} ms)");
        return (action, max);
    }

    private static TimeSpan? ParseOptionalDuration(string? text, string option)
    {
        if (text is null) return null;
        if (!Units.TryParseDuration(text, out var t) || t <= TimeSpan.Zero || t > TimeSpan.FromDays(1)) throw new UsageException($"{option} '{text}': expected a positive duration such as 10s (at most 1 day)");
        return t;
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
