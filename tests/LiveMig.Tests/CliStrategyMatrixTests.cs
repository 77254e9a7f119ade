using System.CommandLine;
using System.Text.RegularExpressions;
using LiveMig.Cli;
using LiveMig.DirtyTracking;
using LiveMig.Engine;
using LiveMig.Pipeline;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// Every option the README lists for <c>demo</c> and <c>migrate</c>, under every strategy: it
/// either takes effect (the parsed settings show it) or is refused with one line naming the
/// option and the strategy. Never silently ignored.
/// </summary>
public sealed partial class CliStrategyMatrixTests
{
    private sealed record Parsed(MigrationOptions Options, VmConfig Vm, ParseResult Result, CliOptions Cli);

    private static readonly Lazy<string> PskFile = new(() =>
    {
        string path = Path.Combine(Path.GetTempPath(), $"livemig-matrix-{Environment.ProcessId}.psk");
        File.WriteAllBytes(path, new byte[32]);
        return path;
    });

    /// <summary>A CA and a source certificate, for the options that need certificates.</summary>
    private static readonly Lazy<string> CertDir = new(() =>
    {
        string dir = Path.Combine(Path.GetTempPath(), $"livemig-matrix-{Environment.ProcessId}-certs");
        LiveMig.Transport.Certificates.WriteCaAndHosts(dir, ["src"]);
        return dir;
    });

    private static string[] WithCertificates(params string[] more) =>
        ["--tls", "--cert", Path.Combine(CertDir.Value, "src.pem"), "--key", Path.Combine(CertDir.Value, "src.key"), "--ca", Path.Combine(CertDir.Value, "ca.pem"), .. more];

    /// <summary>Per option: the arguments that set it, and how its effect shows.</summary>
    private static readonly Dictionary<string, (string[] Args, Func<Parsed, bool> Effect)> Samples = new()
    {
        ["--name"] = (["--name", "web-1"], p => p.Vm.Name == "web-1"),
        ["--memory"] = (["--memory", "128MiB"], p => p.Vm.MemoryBytes == 128L << 20),
        ["--memory-file"] = (["--memory-file", "/nonexistent-dir/vm.mem"], p => p.Vm.MemoryFile == "/nonexistent-dir/vm.mem"),
        ["--vcpus"] = (["--vcpus", "3"], p => p.Vm.Vcpus == 3),
        ["--workload"] = (["--workload", "random:rate=100"], p => p.Vm.Workload == "random:rate=100"),
        ["--seed"] = (["--seed", "9"], p => p.Vm.Seed == 9),
        ["--fill"] = (["--fill", "random"], p => p.Vm.Fill == MemoryFill.Random),
        ["--dirty-log"] = (["--dirty-log", "software"], p => p.Vm.DirtyLog == DirtyLogKind.Software),
        ["--warmup"] = (["--warmup", "2s"], p => p.Cli.WarmupTime(p.Result) == TimeSpan.FromSeconds(2)),
        ["--strategy"] = ([], _ => true), // the axis of the matrix
        ["--hybrid-budget"] = (["--hybrid-budget", "rounds=2"], p => p.Options.PostCopy.Hybrid.MaxRounds == 2),
        ["--demand-paging"] = (["--demand-paging", "portable"], p => p.Result.GetValue(p.Cli.DemandPaging) is { } m && CliOptions.ParseDemandPaging(m) == DemandPagingMode.Portable),
        ["--streams"] = (["--streams", "2"], p => p.Options.Streams == 2),
        ["--bandwidth"] = (["--bandwidth", "100MiB/s"], p => p.Options.BandwidthLimit == 100L << 20),
        ["--downtime-limit"] = (["--downtime-limit", "50ms"], p => p.Options.PreCopy.DowntimeLimit == TimeSpan.FromMilliseconds(50)),
        ["--max-rounds"] = (["--max-rounds", "7"], p => p.Options.PreCopy.MaxRounds == 7),
        ["--verify"] = (["--verify", "false"], p => !p.Options.Verify),
        ["--json"] = (["--json"], p => p.Result.GetValue(p.Cli.Json)),
        ["--tls"] = (["--tls", "--psk-file", PskFile.Value], p => p.Options.Security.Mode == "tls13-psk"),
        ["--tls-hostname"] = (WithCertificates("--tls-hostname", "dst.lan"), p => p.Options.TlsHostname == "dst.lan" && p.Options.Security.Mode == "tls13-certificates"),
        ["--control"] = (["--control", "/tmp/x.sock"], p => p.Result.GetValue<string>("--control") == "/tmp/x.sock"),
        ["--reconnect"] = (["--reconnect", "5s"], p => p.Options.ReconnectWindow == TimeSpan.FromSeconds(5) && p.Options.PostCopy.RecoveryTimeout == TimeSpan.FromSeconds(5)),
        ["--defer-hot-pages"] = (["--defer-hot-pages"], p => p.Options.PreCopy.DeferHotPages),
        ["--predictive-stop"] = (["--predictive-stop"], p => p.Options.PreCopy.PredictiveStop),
        ["--auto-converge"] = (["--auto-converge"], p => p.Options.PreCopy.AutoConverge is not null),
        ["--dirty-limit"] = (["--dirty-limit", "2000"], p => p.Options.PreCopy.DirtyLimit == 2000),
        ["--on-stall"] = (["--on-stall", "throttle"], p => p.Options.PreCopy.OnStall == Policies.StallAction.Throttle),
        ["--max-downtime"] = (["--on-stall", "pause", "--max-downtime", "1s"], p => p.Options.PreCopy.MaxDowntime == TimeSpan.FromSeconds(1) && p.Options.PreCopy.OnStall == Policies.StallAction.Pause),
        ["--timeout"] = (["--timeout", "10s"], p => p.Options.PreCopy.TimeBudget == TimeSpan.FromSeconds(10)),
        ["--compress"] = (["--compress", "lz4"], p => p.Options.Pipeline.Compression == CompressionKind.Lz4),
        ["--xbzrle-cache"] = (["--xbzrle-cache", "8MiB"], p => p.Options.Pipeline.XbzrleCacheBytes == 8L << 20),
        ["--dedup"] = (["--dedup"], p => p.Options.Pipeline.Dedup),
        ["--skip-free-pages"] = (["--skip-free-pages"], p => p.Options.Pipeline.SkipFreePages),
        ["--optimize"] = (["--optimize", "all"], p => p.Options.Pipeline.Compression == CompressionKind.Adaptive && p.Options.Pipeline.SkipFreePages),
    };

    [GeneratedRegex(@"^\| `(--[a-z-]+)")]
    private static partial Regex OptionRow();

    /// <summary>The options of the README's table "Options (`demo` and `migrate`)".</summary>
    private static List<string> ReadmeOptions()
    {
        var dir = new DirectoryInfo(AppContext.BaseDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "README.md"))) dir = dir.Parent;
        Assert.NotNull(dir);
        var lines = File.ReadAllLines(Path.Combine(dir!.FullName, "README.md"));
        int start = Array.FindIndex(lines, l => l.StartsWith("## Options", StringComparison.Ordinal));
        Assert.True(start >= 0, "README has no Options section");
        var names = new List<string>();
        for (int i = start + 1; i < lines.Length && !lines[i].StartsWith('#'); i++)
            if (OptionRow().Match(lines[i]) is { Success: true } m) names.Add(m.Groups[1].Value);
        return names;
    }

    private static (Parsed? Parsed, UsageException? Refused) Parse(string strategy, string[] args, bool migrate)
    {
        var o = new CliOptions();
        var cmd = new Command(migrate ? "migrate" : "demo");
        o.AddVmOptions(cmd);
        o.AddMigrationOptions(cmd);
        if (migrate) cmd.Add(new Option<string>("--control") { DefaultValueFactory = _ => "/tmp/livemig-migrate.sock" });
        else cmd.Add(o.DemandPaging);
        var r = cmd.Parse(["--strategy", strategy, .. args]);
        Assert.Empty(r.Errors);
        try
        {
            var options = o.MigrationOptions(r);
            return (new Parsed(options, o.VmConfig(r), r, o), null);
        }
        catch (UsageException e) { return (null, e); }
    }

    public static TheoryData<string> Strategies => new() { "precopy", "postcopy", "hybrid" };

    [Theory]
    [MemberData(nameof(Strategies))]
    public void Cli_every_readme_option_takes_effect_or_is_refused_naming_the_option_and_the_strategy(string strategy)
    {
        var options = ReadmeOptions();
        Assert.True(options.Count >= 25, $"only {options.Count} options found in the README's table");
        var refused = new List<string>();
        foreach (string name in options)
        {
            Assert.True(Samples.TryGetValue(name, out var sample), $"README option {name} has no entry in this test: say how its effect shows");
            var (parsed, error) = Parse(strategy, sample.Args, migrate: name == "--control");
            if (error is not null)
            {
                Assert.Contains(name, error.Message);
                Assert.Contains($"--strategy {strategy}", error.Message);
                Assert.DoesNotContain('\n', error.Message);
                refused.Add(name);
            }
            else Assert.True(sample.Effect(parsed!), $"{name} under --strategy {strategy} was accepted but did not take effect");
        }
        // What each strategy refuses is a property of the strategy, not of chance.
        var expected = strategy switch
        {
            "precopy" => new[] { "--hybrid-budget", "--demand-paging" },
            "postcopy" => ["--dirty-log", "--hybrid-budget", "--streams", "--downtime-limit", "--max-rounds", "--defer-hot-pages", "--predictive-stop", "--auto-converge", "--dirty-limit", "--on-stall", "--max-downtime", "--timeout", "--xbzrle-cache", "--dedup"],
            _ => ["--streams", "--on-stall", "--max-downtime"],
        };
        Assert.Equal(expected.Order(), refused.Order());
    }

    [Fact]
    public void Cli_optimize_all_under_postcopy_takes_what_postcopy_can_use_and_a_named_stage_it_cannot_is_refused()
    {
        var (p, _) = Parse("postcopy", ["--optimize", "all"], migrate: false);
        Assert.Equal(CompressionKind.Adaptive, p!.Options.Pipeline.Compression);
        Assert.True(p.Options.Pipeline.SkipFreePages);
        Assert.Equal(0, p.Options.Pipeline.XbzrleCacheBytes);
        Assert.False(p.Options.Pipeline.Dedup);
        var (_, error) = Parse("postcopy", ["--optimize", "compress,dedup"], migrate: false);
        Assert.NotNull(error);
        Assert.Contains("--optimize", error!.Message);
        Assert.Contains("--strategy postcopy", error.Message);
    }
}
