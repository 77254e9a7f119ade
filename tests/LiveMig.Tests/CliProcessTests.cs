using System.Diagnostics;
using System.Text.RegularExpressions;
using LiveMig.Reporting;

namespace LiveMig.Tests;

/// <summary>The livemig command as a user runs it: separate OS processes, real TCP between them.</summary>
[Trait("Category", "Heavy")]
public class CliProcessTests
{
    private static readonly string CliDll = Path.Combine(AppContext.BaseDirectory, "LiveMig.Cli.dll");

    private static Process Start(params string[] args)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(CliDll);
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi)!;
    }

    [Fact]
    public void Listen_and_migrate_in_two_processes_verify_and_agree()
    {
        using var listen = Start("listen", "--port", "0", "--once", "--json");
        int port = 0;
        var stderr = new List<string>();
        while (port == 0)
        {
            string? line = listen.StandardError.ReadLine();
            Assert.NotNull(line);
            stderr.Add(line);
            var m = Regex.Match(line, @"listening on [0-9.]+:(\d+)");
            if (m.Success) port = int.Parse(m.Groups[1].Value);
        }
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--memory", "128MiB", "--workload", "hotcold:rate=20000", "--warmup", "300ms", "--json");
        string srcJson = migrate.StandardOutput.ReadToEnd();
        string srcErr = migrate.StandardError.ReadToEnd();
        Assert.True(migrate.WaitForExit(60_000));
        Assert.True(migrate.ExitCode == 0, $"migrate exited {migrate.ExitCode}: {srcErr}");
        string dstJson = listen.StandardOutput.ReadToEnd();
        Assert.True(listen.WaitForExit(60_000));
        Assert.Equal(0, listen.ExitCode);

        var src = MigrationReport.FromJson(srcJson);
        var dst = MigrationReport.FromJson(dstJson);
        Assert.Equal("completed", src.Outcome);
        Assert.True(src.Verified);
        Assert.True(dst.Verified);
        Assert.Equal(src.MigrationId, dst.MigrationId);
        Assert.Equal(src.SourceHash, dst.DestinationHash);
        Assert.Equal(src.BytesOnWire, dst.BytesOnWire);
        Assert.Equal(src.Rounds.Count, dst.Rounds.Count);
    }

    [Fact]
    public void Bad_options_get_one_line_naming_the_option()
    {
        foreach (var (args, expect) in new[]
        {
            (new[] { "demo", "--memory", "-5GiB" }, "--memory"),
            (new[] { "demo", "--memory", "100TiB" }, "--memory"),
            (new[] { "demo", "--workload", "nosuch" }, "--workload"),
            (new[] { "demo", "--workload", "hotcold:wss=200%" }, "--workload"),
            (new[] { "demo", "--bandwidth", "fast" }, "--bandwidth"),
            (new[] { "demo", "--downtime-limit", "-1s" }, "--downtime-limit"),
            (new[] { "demo", "--vcpus", "0" }, "--vcpus"),
            (new[] { "migrate", "--to", "nowhere" }, "--to"),
            (new[] { "demo", "--auto-converge", "150,10" }, "--auto-converge"),
            (new[] { "demo", "--dirty-limit", "fast" }, "--dirty-limit"),
            (new[] { "demo", "--compress", "gzip" }, "--compress"),
            (new[] { "demo", "--compress", "zstd:99" }, "--compress"),
            (new[] { "demo", "--xbzrle-cache", "lots" }, "--xbzrle-cache"),
            (new[] { "demo", "--optimize", "everything" }, "--optimize"),
            (new[] { "demo", "--streams", "17" }, "--streams"),
            (new[] { "demo", "--streams", "2", "--strategy", "postcopy" }, "--streams"),
        })
        {
            using var p = Start(args);
            string err = p.StandardError.ReadToEnd().Trim();
            p.StandardOutput.ReadToEnd();
            Assert.True(p.WaitForExit(30_000));
            Assert.Equal(2, p.ExitCode);
            Assert.Single(err.Split('\n'));
            Assert.Contains(expect, err);
        }
    }

    [Fact]
    public void Migrate_to_a_port_nobody_listens_on_fails_clearly()
    {
        using var p = Start("migrate", "--to", "127.0.0.1:1", "--memory", "64MiB", "--warmup", "0s", "--json");
        string err = p.StandardError.ReadToEnd();
        p.StandardOutput.ReadToEnd();
        Assert.True(p.WaitForExit(30_000));
        Assert.Equal(1, p.ExitCode);
        Assert.Contains("cannot connect to destination 127.0.0.1:1", err);
    }

    private static (Process Listen, int Port) StartListener()
    {
        var listen = Start("listen", "--port", "0", "--once", "--json");
        int port = 0;
        while (port == 0)
        {
            string? line = listen.StandardError.ReadLine();
            Assert.NotNull(line);
            var m = Regex.Match(line, @"listening on [0-9.]+:(\d+)");
            if (m.Success) port = int.Parse(m.Groups[1].Value);
        }
        return (listen, port);
    }

    private static string Control(string path, params string[] command)
    {
        // The migrate process opens its control socket once its VM runs: wait for it (bounded).
        var deadline = Stopwatch.StartNew();
        while (!File.Exists(path) && deadline.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(20);
        using var p = Start([.. command, "--control", path]);
        string answer = p.StandardOutput.ReadToEnd() + p.StandardError.ReadToEnd();
        Assert.True(p.WaitForExit(30_000));
        return answer;
    }

    [Fact]
    public void Cancel_stops_a_running_migration_and_the_destination_discards_it()
    {
        var (listen, port) = StartListener();
        using var _ = listen;
        string sock = Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock");
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--memory", "256MiB", "--fill", "random", "--workload", "idle",
            "--bandwidth", "8MiB/s", "--warmup", "0s", "--control", sock, "--json");
        string answer = Control(sock, "cancel");
        Assert.StartsWith("ok", answer);
        string srcErr = migrate.StandardError.ReadToEnd();
        string srcOut = migrate.StandardOutput.ReadToEnd();
        Assert.True(migrate.WaitForExit(60_000));
        Assert.Equal(1, migrate.ExitCode);
        Assert.Contains("migration cancelled", srcErr);
        Assert.Equal("failed", MigrationReport.FromJson(srcOut).Outcome);
        listen.StandardOutput.ReadToEnd();
        Assert.True(listen.WaitForExit(60_000));
        Assert.Equal(1, listen.ExitCode); // --once: the incoming migration failed (cancelled by the source)
    }

    [Fact]
    public void Set_bandwidth_changes_the_cap_of_a_running_migration()
    {
        var (listen, port) = StartListener();
        using var _ = listen;
        string sock = Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock");
        // At 4 MiB/s this would take a minute; lifting the cap lets it finish in seconds.
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--memory", "256MiB", "--fill", "random", "--workload", "idle",
            "--bandwidth", "4MiB/s", "--warmup", "0s", "--control", sock, "--json");
        Assert.StartsWith("ok: bandwidth unlimited", Control(sock, "set-bandwidth", "unlimited"));
        Assert.StartsWith("error", Control(sock, "set-bandwidth", "fast") + " ");
        string srcOut = migrate.StandardOutput.ReadToEnd();
        migrate.StandardError.ReadToEnd();
        Assert.True(migrate.WaitForExit(60_000));
        var report = MigrationReport.FromJson(srcOut);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.True(report.TotalTimeMs < 30_000, $"took {report.TotalTimeMs} ms");
        listen.StandardOutput.ReadToEnd();
        Assert.True(listen.WaitForExit(60_000));
    }

    [Fact]
    public void Source_process_killed_mid_migration_makes_the_destination_discard_it()
    {
        var (listen, port) = StartListener();
        using var _ = listen;
        string sock = Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock");
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--memory", "256MiB", "--fill", "random", "--workload", "idle",
            "--bandwidth", "8MiB/s", "--warmup", "0s", "--control", sock, "--json");
        var deadline = Stopwatch.StartNew();
        while (!File.Exists(sock) && deadline.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(20);
        Thread.Sleep(300); // let some pages flow; the kill may land anywhere in the live phase
        migrate.Kill(entireProcessTree: true);
        string dstOut = listen.StandardOutput.ReadToEnd();
        Assert.True(listen.WaitForExit(60_000));
        Assert.Equal(1, listen.ExitCode);
        var report = MigrationReport.FromJson(dstOut);
        Assert.Equal("failed", report.Outcome);
        Assert.Contains("closed the connection", report.Error);
    }

    [Fact]
    public void Demo_with_every_pipeline_stage_completes_and_reports_them()
    {
        using var p = Start("demo", "--memory", "128MiB", "--workload", "hotcold:rate=20000,wss=25%", "--bandwidth", "256MiB/s", "--warmup", "300ms", "--optimize", "all", "--json");
        string json = p.StandardOutput.ReadToEnd();
        string err = p.StandardError.ReadToEnd();
        Assert.True(p.WaitForExit(60_000));
        Assert.True(p.ExitCode == 0, $"demo exited {p.ExitCode}: {err}");
        var r = MigrationReport.FromJson(json);
        Assert.True(r.Verified);
        Assert.Equal("compress=adaptive xbzrle=64.0 MiB dedup skip-free-pages", r.Pipeline);
        Assert.True(r.PagesByEncoding["skipped"] > 0);
        Assert.Contains("xbzrle", r.Stages.Keys);
        Assert.Contains("adaptive", r.Stages.Keys);
    }

    [Fact]
    public void Demo_with_several_streams_and_tls_completes_and_reports_them()
    {
        using var p = Start("demo", "--memory", "128MiB", "--workload", "random:rate=20000", "--warmup", "300ms", "--streams", "3", "--tls", "--psk-file", PskFile(), "--json");
        string json = p.StandardOutput.ReadToEnd();
        string err = p.StandardError.ReadToEnd();
        Assert.True(p.WaitForExit(60_000));
        Assert.True(p.ExitCode == 0, $"demo exited {p.ExitCode}: {err}");
        var r = MigrationReport.FromJson(json);
        Assert.True(r.Verified);
        Assert.Equal(3, r.Streams);
        Assert.Equal("tls13-psk", r.Security);
    }

    private static string PskFile()
    {
        string path = Path.Combine(Path.GetTempPath(), $"livemig-test-psk-{Environment.ProcessId}");
        File.WriteAllBytes(path, System.Security.Cryptography.RandomNumberGenerator.GetBytes(32));
        return path;
    }
}
