using System.Diagnostics;
using System.Text.RegularExpressions;
using LiveMig.Reporting;

namespace LiveMig.Tests;

/// <summary>
/// An operator's commands against agents in their own processes (issue 10, items 4 and 6):
/// list, status, stop, start, destroy, migrate --vm, unique names, control sockets nobody can
/// take over, and one-line refusals with exit code 2 for every subcommand.
/// </summary>
[Trait("Category", "Heavy")]
public class CliOperatorTests
{

    private static Process Start(params string[] args) => CliChild.Start(args);

    private sealed record Result(int Code, string Out, string Err);

    private static Result Run(params string[] args)
    {
        using var p = Start(args);
        var err = p.StandardError.ReadToEndAsync();
        string output = ChildOutput.All(p, p.StandardOutput);
        Assert.True(p.WaitForExit(120_000), $"livemig {string.Join(' ', args)} did not exit");
        return new Result(p.ExitCode, output, err.Result);
    }

    private static string Sock(string what) => Path.Combine(Path.GetTempPath(), $"lm-{what}-{Guid.NewGuid().ToString("N")[..12]}.sock");

    /// <summary>An agent process on a free port with its own control socket; its stderr is drained into <see cref="Log"/>.</summary>
    private sealed class Agent : IDisposable
    {
        private readonly Process _p;
        private readonly List<string> _log = [];

        public Agent()
        {
            Control = Sock("agent");
            _p = Start("listen", "--port", "0", "--control", Control);
            while (Port == 0)
            {
                string? line = ChildOutput.Line(_p, _p.StandardError);
                Assert.True(line is not null, "listen ended before listening: " + Log);
                _log.Add(line!);
                var m = Regex.Match(line!, @"listening on [0-9.]+:(\d+) \(control socket (.+)\)");
                if (m.Success) Port = int.Parse(m.Groups[1].Value);
            }
            new Thread(() => { for (string? l; (l = ChildOutput.Line(_p, _p.StandardError)) is not null;) lock (_log) _log.Add(l); }) { IsBackground = true }.Start();
        }

        public int Port { get; }
        public string Control { get; }
        public int Pid => _p.Id;
        public string Log { get { lock (_log) return string.Join('\n', _log); } }

        public AgentListing List()
        {
            var r = Run("list", "--control", Control, "--json");
            Assert.True(r.Code == 0, r.Err);
            return AgentListing.FromJson(r.Out);
        }

        public void Dispose()
        {
            _p.Kill(entireProcessTree: true);
            _p.WaitForExit(10_000);
            _p.Dispose();
        }
    }

    private static string[] Vm(string name, params string[] extra) =>
        ["--name", name, "--memory", "64MiB", "--workload", "sweep:rate=5000", "--warmup", "200ms", "--control", Sock("m"), .. extra];

    [Fact]
    public void An_operator_lists_moves_stops_and_destroys_vms_on_agents_and_names_stay_unique()
    {
        using var a = new Agent();
        using var b = new Agent();
        var first = Run(["migrate", "--to", $"127.0.0.1:{a.Port}", .. Vm("web"), "--json"]);
        Assert.True(first.Code == 0, first.Err);
        var arrived = MigrationReport.FromJson(first.Out);
        var atA = a.List().Vms.Single();
        Assert.Equal(("web", "builtin", 64L << 20, "running", arrived.MigrationId), (atA.Name, atA.Kind, atA.MemoryBytes, atA.State, atA.ArrivedBy));

        // The same name again: refused at Hello, in one line; the VM stays where it was (here: the source process).
        var twin = Run(["migrate", "--to", $"127.0.0.1:{a.Port}", .. Vm("web")]);
        Assert.Equal(1, twin.Code);
        Assert.Contains("a VM named 'web' already runs here", twin.Err);
        Assert.Single(twin.Err.Trim().Split('\n'), l => l.StartsWith("livemig:", StringComparison.Ordinal) && !l.Contains("warning"));
        Assert.Single(a.List().Vms);

        // Onward from A to B, driven through A's control socket.
        var onward = Run("migrate", "--vm", "web", "--to", $"127.0.0.1:{b.Port}", "--control", a.Control, "--bandwidth", "1Gbit", "--json");
        Assert.True(onward.Code == 0, onward.Err);
        var moved = MigrationReport.FromJson(onward.Out);
        Assert.Equal(("completed", true, "web"), (moved.Outcome, moved.Verified, moved.VmName));
        Assert.Equal(1e9 / 8, moved.BandwidthLimitBytesPerSecond); // the options travelled with the request
        Assert.Empty(a.List().Vms);
        Assert.Equal(moved.MigrationId, b.List().Vms.Single().ArrivedBy);
        Assert.Contains("VM web migrated to", a.Log);

        Assert.StartsWith("ok: VM web stopped", Run("stop", "web", "--control", b.Control).Out);
        Assert.Equal("paused", b.List().Vms.Single().State);
        var refused = Run("migrate", "--vm", "web", "--to", $"127.0.0.1:{a.Port}", "--control", b.Control);
        Assert.Equal(1, refused.Code);
        Assert.Contains("VM 'web' is paused", refused.Err);
        Assert.StartsWith("ok: VM web running", Run("start", "web", "--control", b.Control).Out);
        var missing = Run("destroy", "nosuch", "--control", b.Control);
        Assert.Equal((1, "livemig: no VM named 'nosuch' here"), (missing.Code, missing.Err.Trim()));
        Assert.StartsWith("ok: VM web destroyed", Run("destroy", "web", "--control", b.Control).Out);
        Assert.Empty(b.List().Vms);
        // The table form, for people.
        var table = Run("list", "--control", b.Control);
        Assert.Contains("no VMs", table.Out);
    }

    [Fact]
    public void Status_shows_the_live_figures_on_both_sides_and_list_shows_the_migration_in_progress()
    {
        using var b = new Agent();
        string own = Sock("slow");
        using var migrate = Start("migrate", "--to", $"127.0.0.1:{b.Port}", "--name", "slow", "--memory", "256MiB", "--fill", "random", "--workload", "idle",
            "--bandwidth", "16MiB/s", "--warmup", "0s", "--control", own, "--json");
        string id = ReadMigrationId(migrate);
        MigrationStatus? src = null, dst = null;
        var deadline = Stopwatch.StartNew();
        while ((src is not { PagesTransferred: > 0 } || dst is not { PagesTransferred: > 0 }) && deadline.Elapsed < TimeSpan.FromSeconds(30))
        {
            src = TryStatus(id, own);
            dst = TryStatus(id, b.Control);
            Thread.Sleep(100);
        }
        Assert.NotNull(src);
        Assert.NotNull(dst);
        Assert.Equal(("source", "slow", "live", 0), (src!.Role, src.VmName, src.Phase, src.Round));
        Assert.Equal(("destination", "slow", "live", 0), (dst!.Role, dst.VmName, dst.Phase, dst.Round));
        Assert.Equal(16L << 20, src.BandwidthLimitBytesPerSecond);
        Assert.True(src.PagesRemaining > 0 && dst.PagesRemaining > 0, $"{src.PagesRemaining} / {dst.PagesRemaining}");
        Assert.Equal($"127.0.0.1:{b.Port}", src.Peer);
        Assert.Equal(id, b.List().Migrations.Single().MigrationId);
        var table = Run("status", id, "--control", own);
        Assert.Contains("pages remaining", table.Out);
        Assert.Contains("expected downtime", table.Out);
        // A wrong ID is a refusal (exit 1), a malformed one a usage error (exit 2).
        Assert.Equal(1, Run("status", Guid.NewGuid().ToString(), "--control", own).Code);
        Assert.Equal(2, Run("status", "nope", "--control", own).Code);
        Assert.StartsWith("ok", Run("cancel", id, "--control", own).Out);
        ChildOutput.All(migrate, migrate.StandardOutput);
        Assert.True(migrate.WaitForExit(60_000));
        Assert.Equal(1, migrate.ExitCode);
        Assert.False(File.Exists(own), "the migrate left its control socket behind");
    }

    private static MigrationStatus? TryStatus(string id, string control)
    {
        var r = Run("status", id, "--control", control, "--json");
        return r.Code == 0 ? MigrationStatus.FromJson(r.Out) : null;
    }

    private static string ReadMigrationId(Process migrate)
    {
        for (string? line; (line = ChildOutput.Line(migrate, migrate.StandardError)) is not null;)
            if (Regex.Match(line, @"migration ([0-9a-f-]{36}) to") is { Success: true } m) return m.Groups[1].Value;
        Assert.Fail("migrate did not print its migration ID");
        return "";
    }

    [Fact]
    public void A_second_migrate_cannot_take_over_the_first_ones_control_socket()
    {
        using var b = new Agent();
        string sock = Sock("shared");
        using var first = Start("migrate", "--to", $"127.0.0.1:{b.Port}", "--name", "one", "--memory", "256MiB", "--fill", "random", "--workload", "idle",
            "--bandwidth", "8MiB/s", "--warmup", "0s", "--control", sock, "--json");
        string id = ReadMigrationId(first);
        var second = Run("migrate", "--to", $"127.0.0.1:{b.Port}", "--name", "two", "--memory", "64MiB", "--warmup", "0s", "--control", sock);
        Assert.Equal(2, second.Code);
        Assert.Equal($"livemig: --control {sock}: in use by another running process (a connection to it succeeded); give this one its own path", second.Err.Trim());
        Assert.True(File.Exists(sock), "the refused migrate deleted the first one's socket");
        // Still the first one's: cancel reaches it.
        Assert.StartsWith("ok", Run("cancel", id, "--control", sock).Out);
        string srcOut = ChildOutput.All(first, first.StandardOutput);
        Assert.True(first.WaitForExit(60_000));
        Assert.Equal(1, first.ExitCode);
        Assert.Equal("failed", MigrationReport.FromJson(srcOut).Outcome);
        Assert.False(File.Exists(sock));
    }

    [Fact]
    public void Destroyed_vms_give_their_memory_and_threads_back_to_the_agent_process()
    {
        using var a = new Agent();
        const int count = 5;
        var (rss0, threads0) = ProcStatus(a.Pid);
        for (int i = 0; i < count; i++)
        {
            var r = Run("migrate", "--to", $"127.0.0.1:{a.Port}", "--name", $"r{i}", "--memory", "64MiB", "--fill", "random", "--workload", "idle", "--warmup", "0s", "--control", Sock("r"));
            Assert.True(r.Code == 0, r.Err);
        }
        var (rss1, threads1) = ProcStatus(a.Pid);
        Assert.True(rss1 - rss0 > count * 48L << 20, $"RSS {rss0 >> 20} → {rss1 >> 20} MiB with {count} VMs of 64 MiB random memory");
        for (int i = 0; i < count; i++) Assert.StartsWith($"ok: VM r{i} destroyed, 64.0 MiB", Run("destroy", $"r{i}", "--control", a.Control).Out);
        var (rss2, threads2) = ProcStatus(a.Pid);
        Assert.True(rss2 - rss0 < (rss1 - rss0) / 4, $"RSS {rss0 >> 20} → {rss1 >> 20} → {rss2 >> 20} MiB: the guests' memory was not given back");
        Assert.True(threads2 <= threads1 - count * 2, $"threads {threads0} → {threads1} → {threads2}: the vCPU threads did not end");
    }

    /// <summary>VmRSS (bytes) and Threads of a process.</summary>
    private static (long Rss, long Threads) ProcStatus(int pid)
    {
        var lines = File.ReadAllLines($"/proc/{pid}/status");
        long Field(string name) => long.Parse(lines.First(l => l.StartsWith(name + ":", StringComparison.Ordinal))[(name.Length + 1)..].Trim().Split(' ')[0]);
        return (Field("VmRSS") * 1024, Field("Threads"));
    }

    [Fact]
    public void Every_subcommand_refuses_a_bad_argument_with_exit_code_2_and_one_line()
    {
        string nowhere = Path.Combine(Path.GetTempPath(), $"lm-none-{Guid.NewGuid():N}.sock");
        foreach (var (args, expect) in new (string[], string)[]
        {
            (["frobnicate"], "frobnicate"),
            (["demo", "--memory", "lots"], "--memory"),
            (["demo", "--bandwidth", "0"], "--bandwidth '0': expected a rate above 0"),
            (["demo", "--bandwidth", "0MiB/s"], "--bandwidth '0MiB/s': expected a rate above 0"),
            (["demo", "--name", "two words"], "--name"),
            (["listen", "--port", "70000"], "--port"),
            (["listen", "--port", "0", "--control", "/nonexistent-dir/x.sock"], "--control"),
            (["migrate", "--to", "nowhere"], "--to"),
            (["migrate", "--to", "127.0.0.1:1", "--name", "bad/name"], "--name"),
            (["migrate", "--to", "127.0.0.1:1", "--reconnect", "forever"], "--reconnect"),
            (["migrate", "--to", "127.0.0.1:1", "--compress", "gzip"], "--compress"),
            (["migrate", "--vm", "web", "--to", "127.0.0.1:1", "--memory", "1GiB"], "--memory: not with --vm"),
            (["migrate", "--vm", "web", "--to", "127.0.0.1:1", "--control", nowhere], "nothing is listening"),
            (["migrate", "--resume", "not-an-id"], "--resume"),
            (["cancel", "not-an-id"], "cancel"),
            (["cancel", "--control", nowhere], "nothing is listening"),
            (["set-bandwidth", "fast"], "set-bandwidth 'fast'"),
            (["set-bandwidth", "0MiB/s"], "expected a rate above 0"),
            (["certs", "--out", "/proc/nope", "--hosts", "a"], "--out '/proc/nope'"),
            (["certs", "--out", Path.GetTempPath(), "--hosts", "../x"], "--hosts"),
            (["list", "--control", nowhere], "nothing is listening"),
            (["list", "--bogus"], "--bogus"),
            (["status", "not-an-id"], "status 'not-an-id'"),
            (["status"], "status"),
            (["stop"], "stop"),
            (["start", "web", "--control", nowhere], "nothing is listening"),
            (["destroy", "web", "--control", nowhere], "nothing is listening"),
            (["simulate", "/nonexistent-dir/x.yaml"], "cannot read it"),
            (["simulate", "x.yaml", "--seed", "many"], "--seed"),
        })
        {
            var r = Run(args);
            string err = r.Err.Trim();
            Assert.True(r.Code == 2, $"livemig {string.Join(' ', args)}: exit {r.Code}: {err}");
            Assert.True(err.Split('\n').Length == 1, $"livemig {string.Join(' ', args)}: more than one line: {err}");
            Assert.StartsWith("livemig: ", err);
            Assert.Contains(expect, err);
            Assert.DoesNotContain("   at ", err); // no stack trace
        }
    }
}
