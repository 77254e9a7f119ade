using System.Diagnostics;
using System.Text.RegularExpressions;
using LiveMig.Reporting;

namespace LiveMig.Tests;

/// <summary>The livemig command as a user runs it: separate OS processes, real TCP between them.</summary>
[Trait("Category", "Heavy")]
public class CliProcessTests
{

    private static Process Start(params string[] args) => CliChild.Start(args);

    [Fact]
    public void Listen_and_migrate_in_two_processes_verify_and_agree()
    {
        using var listen = Start("listen", "--port", "0", "--once", "--json");
        int port = 0;
        var stderr = new List<string>();
        while (port == 0)
        {
            string? line = ChildOutput.Line(listen, listen.StandardError);
            Assert.NotNull(line);
            stderr.Add(line);
            var m = Regex.Match(line, @"listening on [0-9.]+:(\d+)");
            if (m.Success) port = int.Parse(m.Groups[1].Value);
        }
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--memory", "128MiB", "--workload", "hotcold:rate=20000", "--warmup", "300ms", "--json");
        string srcJson = ChildOutput.All(migrate, migrate.StandardOutput);
        string srcErr = ChildOutput.All(migrate, migrate.StandardError);
        Assert.True(migrate.WaitForExit(60_000));
        Assert.True(migrate.ExitCode == 0, $"migrate exited {migrate.ExitCode}: {srcErr}");
        string dstJson = ChildOutput.All(listen, listen.StandardOutput);
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
            string err = ChildOutput.All(p, p.StandardError).Trim();
            ChildOutput.All(p, p.StandardOutput);
            Assert.True(p.WaitForExit(30_000));
            Assert.Equal(2, p.ExitCode);
            Assert.Single(err.Split('\n'));
            Assert.Contains(expect, err);
        }
    }

    [Fact]
    public void Migrate_to_a_port_nobody_listens_on_fails_clearly()
    {
        using var p = Start("migrate", "--to", "127.0.0.1:1", "--memory", "64MiB", "--warmup", "0s", "--json", "--control", Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock"));
        string err = ChildOutput.All(p, p.StandardError);
        ChildOutput.All(p, p.StandardOutput);
        Assert.True(p.WaitForExit(30_000));
        Assert.Equal(1, p.ExitCode);
        Assert.Contains("cannot connect to destination 127.0.0.1:1", err);
    }

    private static (Process Listen, int Port) StartListener(params string[] extra)
    {
        var listen = Start(["listen", "--port", "0", "--once", "--json", .. extra]);
        int port = 0;
        while (port == 0)
        {
            string? line = ChildOutput.Line(listen, listen.StandardError);
            Assert.NotNull(line);
            var m = Regex.Match(line, @"listening on [0-9.]+:(\d+)");
            if (m.Success) port = int.Parse(m.Groups[1].Value);
        }
        return (listen, port);
    }

    /// <summary>
    /// Reads <paramref name="migrate"/>'s stderr up to the line naming its migration, then asks its
    /// control socket (bounded) until pages have gone out: the migration is live, not still
    /// making its VM (the control socket exists before the VM does). In post-copy: past the switch.
    /// </summary>
    private static Guid WaitUntilPagesFlow(Process migrate, string sock, List<string>? seen = null)
    {
        Guid id = Guid.Empty;
        while (id == Guid.Empty)
        {
            string? line = ChildOutput.Line(migrate, migrate.StandardError);
            Assert.True(line is not null, "migrate ended before it started migrating: " + string.Join(" | ", seen ?? []));
            seen?.Add(line);
            if (Regex.Match(line, @"^migration ([0-9a-f-]{36}) to") is { Success: true } m) id = Guid.Parse(m.Groups[1].Value);
        }
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            string answer = Control(sock, "status", id.ToString(), "--json");
            if (answer.TrimStart().StartsWith('{') && MigrationStatus.FromJson(answer.Trim()) is { PagesTransferred: > 0 } or { Phase: "post-copy" }) return id;
            Assert.True(deadline.Elapsed < TimeSpan.FromSeconds(60), $"no page sent within 60 s; status: {answer}");
            Thread.Sleep(50);
        }
    }

    private static string Control(string path, params string[] command)
    {
        // The migrate process opens its control socket once its VM runs: wait for it (bounded).
        var deadline = Stopwatch.StartNew();
        while (!File.Exists(path) && deadline.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(20);
        using var p = Start([.. command, "--control", path]);
        string answer = ChildOutput.All(p, p.StandardOutput) + ChildOutput.All(p, p.StandardError);
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
        string srcErr = ChildOutput.All(migrate, migrate.StandardError);
        string srcOut = ChildOutput.All(migrate, migrate.StandardOutput);
        Assert.True(migrate.WaitForExit(60_000));
        Assert.Equal(1, migrate.ExitCode);
        Assert.Contains("migration cancelled", srcErr);
        Assert.Equal("failed", MigrationReport.FromJson(srcOut).Outcome);
        ChildOutput.All(listen, listen.StandardOutput);
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
        Assert.Contains("set-bandwidth 'fast': expected a rate above 0", Control(sock, "set-bandwidth", "fast")); // refused before it is sent
        string srcOut = ChildOutput.All(migrate, migrate.StandardOutput);
        ChildOutput.All(migrate, migrate.StandardError);
        Assert.True(migrate.WaitForExit(60_000));
        var report = MigrationReport.FromJson(srcOut);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.True(report.TotalTimeMs < 30_000, $"took {report.TotalTimeMs} ms");
        ChildOutput.All(listen, listen.StandardOutput);
        Assert.True(listen.WaitForExit(60_000));
    }

    [Fact]
    public void Source_process_killed_mid_migration_makes_the_destination_discard_it()
    {
        // The source asked for resume (migrate's default --reconnect): the partial VM waits the window out, then goes.
        var (listen, port) = StartListener("--resume-window", "1s");
        using var _ = listen;
        string sock = Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock");
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--memory", "256MiB", "--fill", "random", "--workload", "idle",
            "--bandwidth", "8MiB/s", "--warmup", "0s", "--control", sock, "--json");
        WaitUntilPagesFlow(migrate, sock); // the kill lands in the live phase
        migrate.Kill(entireProcessTree: true);
        string dstOut = ChildOutput.All(listen, listen.StandardOutput);
        Assert.True(listen.WaitForExit(60_000));
        Assert.Equal(1, listen.ExitCode);
        var report = MigrationReport.FromJson(dstOut);
        Assert.Equal("failed", report.Outcome);
        // A kill shows as an orderly close or as a reset, depending on where the kernel was.
        Assert.True(report.Error!.Contains("closed the connection") || report.Error.Contains("connection failed"), report.Error);
        Assert.Contains("did not come back within the resume window", report.Error);
    }

    [Fact]
    public void Source_process_killed_after_the_post_copy_switch_is_recovered_from_its_memory_file_and_verifies()
    {
        var (listen, port) = StartListener();
        using var _ = listen;
        string file = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.mem");
        string sock = Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock");
        try
        {
            // A slow push: the kill lands while pages are still to come.
            using var migrate = Start("migrate", "--to", $"127.0.0.1:{port}", "--strategy", "postcopy", "--memory", "128MiB", "--fill", "random", "--workload", "idle",
                "--bandwidth", "8MiB/s", "--warmup", "0s", "--memory-file", file, "--control", sock);
            var seen = new List<string>();
            string id = WaitUntilPagesFlow(migrate, sock, seen).ToString();
            // Pure post-copy: the switch comes first, so pages flowing means the VM runs at the destination.
            migrate.Kill(entireProcessTree: true);
            Assert.True(migrate.WaitForExit(30_000));
            Assert.True(File.Exists(file), "the memory file did not outlive the source");

            using var recover = Start("migrate", "--recover", id, "--memory-file", file, "--to", $"127.0.0.1:{port}", "--control", sock + ".2", "--json");
            string srcOut = ChildOutput.All(recover, recover.StandardOutput);
            string srcErr = ChildOutput.All(recover, recover.StandardError);
            Assert.True(recover.WaitForExit(120_000));
            Assert.True(recover.ExitCode == 0, $"recovery exited {recover.ExitCode}: {srcErr}");
            var source = MigrationReport.FromJson(srcOut);
            Assert.Equal("completed", source.Outcome);
            Assert.True(source.Verified);
            Assert.False(File.Exists(file), "the memory file stayed after the VM was whole at the destination");

            string dstOut = ChildOutput.All(listen, listen.StandardOutput);
            Assert.True(listen.WaitForExit(60_000));
            Assert.Equal(0, listen.ExitCode);
            var destination = MigrationReport.FromJson(dstOut);
            Assert.Equal("completed", destination.Outcome);
            Assert.True(destination.Verified);
            Assert.Equal(source.SourceHash, destination.DestinationHash);
            Assert.True(destination.NetworkFaults >= 1);
        }
        finally { File.Delete(file); }
    }

    /// <summary>A TCP relay between the two processes whose connections the test can cut.</summary>
    private sealed class Relay : IDisposable
    {
        private readonly System.Net.Sockets.TcpListener _listener = new(System.Net.IPAddress.Loopback, 0);
        private readonly List<System.Net.Sockets.Socket> _open = [];
        private readonly int _target;
        public long Bytes;

        public Relay(int target)
        {
            _target = target;
            _listener.Start();
            new Thread(() =>
            {
                while (true)
                {
                    System.Net.Sockets.Socket a;
                    try { a = _listener.AcceptSocket(); } catch (Exception) { return; }
                    var b = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
                    b.Connect(System.Net.IPAddress.Loopback, _target);
                    lock (_open) { _open.Add(a); _open.Add(b); }
                    Pump(a, b);
                    Pump(b, a);
                }
            }) { IsBackground = true }.Start();
        }

        public int Port => ((System.Net.IPEndPoint)_listener.LocalEndpoint).Port;

        private void Pump(System.Net.Sockets.Socket from, System.Net.Sockets.Socket to) => new Thread(() =>
        {
            var buf = new byte[64 << 10];
            try
            {
                int n;
                while ((n = from.Receive(buf)) > 0) { to.Send(buf, n, System.Net.Sockets.SocketFlags.None); Interlocked.Add(ref Bytes, n); }
            }
            catch (Exception) { }
            try { to.Shutdown(System.Net.Sockets.SocketShutdown.Both); } catch (Exception) { }
        }) { IsBackground = true }.Start();

        /// <summary>Resets every relayed connection (both ends see the link die).</summary>
        public void Cut()
        {
            lock (_open)
            {
                foreach (var s in _open) { try { s.LingerState = new System.Net.Sockets.LingerOption(true, 0); s.Close(); } catch (Exception) { } }
                _open.Clear();
            }
        }

        public void Dispose()
        {
            _listener.Stop();
            Cut();
        }
    }

    [Fact]
    public void Link_cut_between_the_processes_is_resumed_and_verifies()
    {
        var (listen, port) = StartListener();
        using var _ = listen;
        using var first = new Relay(port);
        string sock = Path.Combine(Path.GetTempPath(), $"lm-{Guid.NewGuid():N}.sock");
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{first.Port}", "--memory", "128MiB", "--fill", "random", "--workload", "random:rate=200",
            "--bandwidth", "16MiB/s", "--warmup", "0s", "--control", sock, "--reconnect", "60s", "--json");
        string id = "";
        for (string? line; id.Length == 0 && (line = ChildOutput.Line(migrate, migrate.StandardError)) is not null;)
            id = Regex.Match(line, @"migration ([0-9a-f-]{36}) to").Groups[1].Value;
        Assert.False(string.IsNullOrEmpty(id), "migrate did not print its migration ID");
        var deadline = Stopwatch.StartNew();
        while (Interlocked.Read(ref first.Bytes) < 64L << 20 && deadline.Elapsed < TimeSpan.FromSeconds(30)) Thread.Sleep(20);
        // The first relay goes away for good: the source backs off and retries in vain until told
        // where the destination is reachable now.
        first.Dispose();
        using var second = new Relay(port);
        Assert.StartsWith("ok", Control(sock, "migrate", "--resume", id, "--to", $"127.0.0.1:{second.Port}"));
        Assert.Contains("this process migrates", Control(sock, "migrate", "--resume", Guid.NewGuid().ToString()));
        string srcOut = ChildOutput.All(migrate, migrate.StandardOutput);
        string srcErr = ChildOutput.All(migrate, migrate.StandardError);
        Assert.True(migrate.WaitForExit(60_000));
        Assert.True(migrate.ExitCode == 0, srcErr);
        var report = MigrationReport.FromJson(srcOut);
        Assert.Equal("completed", report.Outcome);
        Assert.True(report.Verified);
        Assert.True(report.Reconnects >= 1);
        // Not from scratch (that would be 64 MiB + 128 MiB at least): the guest, what it dirtied
        // (~200 pages/s) and what was lost in flight.
        Assert.True(report.BytesOnWire < 175L << 20, $"{report.BytesOnWire} bytes");
        var dst = MigrationReport.FromJson(ChildOutput.All(listen, listen.StandardOutput));
        Assert.True(listen.WaitForExit(60_000));
        Assert.Equal(report.MigrationId, dst.MigrationId);
        Assert.Equal(report.Reconnects, dst.Reconnects);
    }

    [Fact]
    public void Demo_with_every_pipeline_stage_completes_and_reports_them()
    {
        using var p = Start("demo", "--memory", "128MiB", "--workload", "hotcold:rate=20000,wss=25%", "--bandwidth", "256MiB/s", "--warmup", "300ms", "--optimize", "all", "--json");
        string json = ChildOutput.All(p, p.StandardOutput);
        string err = ChildOutput.All(p, p.StandardError);
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
        string json = ChildOutput.All(p, p.StandardOutput);
        string err = ChildOutput.All(p, p.StandardError);
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
