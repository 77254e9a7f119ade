using System.Diagnostics;
using System.Net.Sockets;
using System.Text.RegularExpressions;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// Floods against a <c>livemig listen</c> process, measured from outside (issue 10, item 3 and
/// "Done when"): 200 concurrent Hellos claiming the largest VM allowed keep the agent within
/// its memory budget while a real migration goes through; a thousand idle connections cost it
/// no thread each. Memory and threads are read from /proc/PID/status.
/// </summary>
[Trait("Category", "Heavy")]
public class BoundedAgentProcessTests
{
    private static readonly string CliDll = Path.Combine(AppContext.BaseDirectory, "LiveMig.Cli.dll");
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);
    private const long MiB = 1L << 20, GiB = 1L << 30;

    /// <summary>An agent process on a free port; its stderr is drained into <see cref="Log"/>.</summary>
    private sealed class Agent : IDisposable
    {
        private readonly Process _p;
        private readonly List<string> _log = [];

        public Agent(params string[] extra)
        {
            var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (string a in (string[])[CliDll, "listen", "--port", "0", "--control", Path.Combine(Path.GetTempPath(), $"lm-bounded-{Guid.NewGuid():N}.sock"), .. extra])
                psi.ArgumentList.Add(a);
            _p = Process.Start(psi)!;
            while (Port == 0)
            {
                string? line = ChildOutput.Line(_p, _p.StandardError);
                Assert.True(line is not null, "listen ended before listening: " + Log);
                _log.Add(line!);
                var m = Regex.Match(line!, @"listening on [0-9.]+:(\d+)");
                if (m.Success) Port = int.Parse(m.Groups[1].Value);
            }
            new Thread(() => { for (string? l; (l = _p.StandardError.ReadLine()) is not null;) lock (_log) _log.Add(l); }) { IsBackground = true }.Start();
            _p.StandardOutput.ReadToEndAsync();
        }

        public int Port { get; }
        public string Log { get { lock (_log) return string.Join('\n', _log); } }

        /// <summary>A figure of /proc/PID/status: VmRSS in bytes, Threads as a count.</summary>
        public long Status(string field)
        {
            foreach (string line in File.ReadLines($"/proc/{_p.Id}/status"))
                if (line.StartsWith(field + ":", StringComparison.Ordinal))
                {
                    long n = long.Parse(line[(field.Length + 1)..].Trim().Split(' ')[0]);
                    return line.EndsWith(" kB", StringComparison.Ordinal) ? n * 1024 : n;
                }
            throw new InvalidOperationException($"no {field} in /proc/{_p.Id}/status");
        }

        public void Dispose()
        {
            _p.Kill(entireProcessTree: true);
            _p.WaitForExit(10_000);
            _p.Dispose();
        }
    }

    /// <summary>Tells when round 0 has begun: the migration's Hello is accepted and its pages flow.</summary>
    private sealed class RoundZero : IMigrationObserver
    {
        public ManualResetEventSlim Started { get; } = new();
        public void RoundStarted(int round, long pagesToSend, bool final) => Started.Set();
    }

    /// <summary>One hostile peer: a Hello claiming <paramref name="memory"/> and 1024 vCPUs; the answer (HelloAck, or the Error's text); the connection stays open.</summary>
    private static async Task<(TcpClient Client, FrameType Answer, string Text)> Claim(int port, int i, long memory)
    {
        var client = new TcpClient { NoDelay = true };
        await client.ConnectAsync("127.0.0.1", port);
        var s = client.GetStream();
        var buf = new byte[512];
        var hello = new HelloMessage(ProtocolVersion.Version, ProtocolVersion.MinSupported, 0, 0, memory, GuestMemory.PageSize, 1024, Guid.NewGuid(), $"flood-{i}", BuiltInVm.KindName);
        await s.WriteAsync(FrameWriter.Encode(FrameType.Hello, buf.AsSpan(0, hello.Write(buf))));
        using var timeout = new CancellationTokenSource(Bound);
        var header = new byte[FrameFormat.HeaderSize];
        await s.ReadExactlyAsync(header, timeout.Token);
        var payload = new byte[BitConverter.ToUInt32(header, 8)];
        await s.ReadExactlyAsync(payload, timeout.Token);
        var type = (FrameType)header[4];
        return (client, type, type == FrameType.Error ? ErrorMessage.Parse(payload).Text : "");
    }

    [Fact]
    public async Task Two_hundred_concurrent_hellos_claiming_the_largest_vm_keep_the_agent_within_its_budget_while_a_real_migration_succeeds()
    {
        using var agent = new Agent("--memory-budget", "8GiB", "--max-memory", "4GiB", "--max-handshakes", "256");
        // The real migration takes its share first (256 MiB, at 64 MiB/s: it runs through the flood).
        using var vm = BuiltInVm.Create(new VmConfig { Name = "real", MemoryBytes = 256 * MiB, Workload = "random:rate=2000", Fill = MemoryFill.Random, Seed = 5 });
        vm.Start();
        var started = new RoundZero();
        var real = Task.Run(() => new PreCopyMigration(vm, new MigrationOptions { BandwidthLimit = 64 * MiB, IoTimeout = Bound }, started).MigrateTo("127.0.0.1", agent.Port));
        Assert.True(started.Started.Wait(Bound), "the real migration did not start: " + agent.Log);
        long rssBefore = agent.Status("VmRSS"), threadsBefore = agent.Status("Threads");

        var claims = await Task.WhenAll(Enumerable.Range(0, 200).Select(i => Claim(agent.Port, i, 4 * GiB))).WaitAsync(Bound);
        long rssFlood = agent.Status("VmRSS");
        try
        {
            // 8 GiB less the real 256 MiB leaves room for exactly one 4 GiB VM; every other Hello is refused, saying why.
            Assert.Equal(1, claims.Count(c => c.Answer == FrameType.HelloAck));
            var refused = claims.Where(c => c.Answer == FrameType.Error).ToList();
            Assert.Equal(199, refused.Count);
            Assert.All(refused, c => Assert.Equal("refused: a VM of 4.00 GiB does not fit this destination's memory budget of 8.00 GiB: 4.25 GiB is held by 2 other migrations or VMs, 3.75 GiB is free", c.Text));

            var report = await real.WaitAsync(Bound);
            Assert.True(report.Verified, "the real migration did not verify");
            long rssAfter = agent.Status("VmRSS");
            // The agent grew by about the real VM's memory, which its pages filled, and by nothing
            // for the claims: the admitted 4 GiB claim holds a sparse mapping, no hash array and
            // none of its 1024 vCPU threads until it sends more than its Hello.
            long grown = Math.Max(rssFlood, rssAfter) - rssBefore;
            Assert.True(grown < 256 * MiB + 160 * MiB, $"the agent grew by {grown / MiB} MiB during the flood (RSS {rssBefore / MiB} → {rssFlood / MiB} → {rssAfter / MiB} MiB)");
            Assert.True(Math.Max(rssFlood, rssAfter) < 8 * GiB);
            // The refused Hellos' threads end once their Error is sent; the admitted one parks no vCPU thread.
            Wait.Until(() => agent.Status("Threads") < threadsBefore + 32);
        }
        finally
        {
            foreach (var c in claims) c.Client.Dispose();
        }
        Wait.Until(() => agent.Log.Contains("VM real arrived"));
    }

    [Fact]
    public async Task A_thousand_idle_connections_cost_the_agent_no_thread_each_and_those_past_the_cap_are_closed_at_once()
    {
        using var agent = new Agent("--max-handshakes", "64", "--handshake-timeout", "600s");
        long threadsBefore = agent.Status("Threads");
        var idle = new List<TcpClient>();
        try
        {
            for (int i = 0; i < 1000; i++)
            {
                var c = new TcpClient();
                await c.ConnectAsync("127.0.0.1", agent.Port);
                idle.Add(c);
            }
            // Each read ends when the agent closes the connection; those in their handshake stay open.
            using var stop = new CancellationTokenSource();
            var reads = idle.Select(c => c.GetStream().ReadAsync(new byte[1], stop.Token).AsTask()).ToList();
            var deadline = Stopwatch.StartNew();
            while (reads.Count(r => r.IsCompleted) < 936 && deadline.Elapsed < Bound) await Task.WhenAny(reads.Where(r => !r.IsCompleted)).WaitAsync(Bound);
            Assert.Equal(936, reads.Count(r => r.IsCompletedSuccessfully && r.Result == 0));
            long threadsFlood = agent.Status("Threads");
            Assert.True(threadsFlood < threadsBefore + 32, $"threads {threadsBefore} → {threadsFlood} with 1000 idle connections");
            Assert.Contains("refusing connections: 64 are in their handshake already (the limit); further refusals are counted", agent.Log);
            stop.Cancel();
        }
        finally
        {
            foreach (var c in idle) c.Dispose();
        }
        // Once they are gone, a migration gets through.
        using var vm = BuiltInVm.Create(new VmConfig { Name = "after", MemoryBytes = 32 * MiB, Workload = "random:rate=2000", Fill = MemoryFill.Mixed });
        vm.Start();
        MigrationFailedException? last = null;
        // The agent sees the 64 closes asynchronously: a migration refused by the cap meanwhile is tried again (at most 20 times).
        for (int attempt = 0; attempt < 20; attempt++)
        {
            try { Assert.True(new PreCopyMigration(vm, new MigrationOptions { IoTimeout = Bound }).MigrateTo("127.0.0.1", agent.Port).Verified); last = null; break; }
            catch (MigrationFailedException e) { last = e; }
        }
        Assert.Null(last);
    }
}
