using System.Net;
using System.Net.Sockets;
using LiveMig.Core;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// The agent bounded under hostile peers (issue 10, item 3), in process over real TCP: one
/// memory budget across all incoming migrations, the handshake's cap and deadline, and the
/// kernel's words for a lost connection. The floods against an agent process are in
/// <see cref="BoundedAgentProcessTests"/>.
/// </summary>
public class BoundedAgentTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(30);
    private const long MiB = 1L << 20;

    private static BuiltInVm RunningVm(string name, long memory = 32 * MiB)
    {
        var vm = BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = memory, Workload = "random:rate=2000", Fill = MemoryFill.Mixed, Seed = 3 });
        vm.Start();
        return vm;
    }

    private static HelloMessage Hello(string name, long memory) =>
        new(ProtocolVersion.Version, ProtocolVersion.MinSupported, 0, 0, memory, GuestMemory.PageSize, 1, Guid.NewGuid(), name, BuiltInVm.KindName);

    /// <summary>A peer that sends a Hello and then holds its connection open, saying nothing more.</summary>
    private sealed class HelloHolder : IDisposable
    {
        private readonly TcpClient _client;

        public HelloHolder(int port, HelloMessage hello)
        {
            _client = new TcpClient("127.0.0.1", port) { NoDelay = true };
            var s = _client.GetStream();
            s.ReadTimeout = (int)Bound.TotalMilliseconds;
            Span<byte> buf = stackalloc byte[512];
            s.Write(FrameWriter.Encode(FrameType.Hello, buf[..hello.Write(buf)]));
            var reader = new FrameReader(s);
            Answer = reader.Read(out var payload);
            if (Answer == FrameType.Error) Error = ErrorMessage.Parse(payload).Text;
        }

        public FrameType Answer { get; }
        public string? Error { get; }

        public void Dispose() => _client.Dispose();
    }

    [Fact]
    public void A_budget_reserves_until_full_refuses_naming_the_sizes_and_takes_each_share_back_once()
    {
        var budget = new MemoryBudget(100 * MiB);
        var a = budget.TryReserve(60 * MiB, out string? why);
        Assert.NotNull(a);
        Assert.Null(why);
        Assert.Null(budget.TryReserve(41 * MiB, out why));
        Assert.Equal("a VM of 41.0 MiB does not fit this destination's memory budget of 100.0 MiB: 60.0 MiB is held by 1 other migration or VM, 40.0 MiB is free", why);
        var b = budget.TryReserve(40 * MiB, out _);
        Assert.Equal(100 * MiB, budget.Reserved);
        a!.Dispose();
        a.Dispose(); // a second release gives nothing back twice
        Assert.Equal(40 * MiB, budget.Reserved);
        b!.Dispose();
        Assert.Equal(0, budget.Reserved);
        Assert.Null(budget.TryReserve(101 * MiB, out why));
        Assert.Equal("a VM of 101.0 MiB does not fit this destination's memory budget of 100.0 MiB", why);
        Assert.Throws<ArgumentOutOfRangeException>(() => new MemoryBudget(0));
        // The default leaves the host a margin, also on a small machine.
        Assert.Equal(21L << 30, MemoryBudget.DefaultFor(24L << 30));
        Assert.Equal(256 * MiB, MemoryBudget.DefaultFor(512 * MiB));
    }

    [Fact]
    public void A_hello_beyond_the_budget_is_refused_in_one_line_and_every_share_comes_back_on_failure_and_destroy()
    {
        using var loop = new Loopback(new DestinationOptions { MemoryBudget = new MemoryBudget(48 * MiB), MaxMemoryBytes = 32 * MiB });
        var budget = loop.Listener.MemoryBudget;
        using (var holder = new HelloHolder(loop.Port, Hello("holder", 32 * MiB)))
        {
            Assert.Equal(FrameType.HelloAck, holder.Answer);
            Assert.Equal(32 * MiB, budget.Reserved); // reserved at Hello, before any page
            using var vm = RunningVm("real");
            var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = Bound }).MigrateTo("127.0.0.1", loop.Port));
            Assert.Equal("destination refused: a VM of 32.0 MiB does not fit this destination's memory budget of 48.0 MiB: 32.0 MiB is held by 1 other migration or VM, 16.0 MiB is free", e.Message);
            Assert.Equal(VmRunState.Running, vm.State);
            Assert.Contains("does not fit", loop.DestinationFailure().Message);
            Assert.Equal(32 * MiB, budget.Reserved); // the refused Hello took nothing
        }
        // The holder went away: its migration failed and gave its share back.
        Wait.Until(() => budget.Reserved == 0);
        using var again = RunningVm("real");
        var (report, arrived) = loop.Migrate(again);
        Assert.True(report.Verified);
        Assert.Equal(32 * MiB, budget.Reserved); // the VM that runs here holds its share
        loop.Listener.Registry.Destroy("real");
        Assert.Equal(0, budget.Reserved);
    }

    [Fact]
    public void A_vm_migrated_onward_gives_its_share_back_to_the_agent_it_left()
    {
        using var a = new Loopback(new DestinationOptions { MemoryBudget = new MemoryBudget(64 * MiB) });
        using var b = new Loopback(new DestinationOptions { MemoryBudget = new MemoryBudget(64 * MiB) });
        using var vm = RunningVm("mover");
        a.Migrate(vm);
        Assert.Equal(32 * MiB, a.Listener.MemoryBudget.Reserved);
        var report = a.Listener.Registry.MigrateAway("mover", new MigrationOptions { IoTimeout = Bound }, "127.0.0.1", b.Port);
        Assert.True(report.Verified);
        Assert.Equal(0, a.Listener.MemoryBudget.Reserved);
        Wait.Until(() => b.Listener.Registry.Find("mover") is not null);
        Assert.Equal(32 * MiB, b.Listener.MemoryBudget.Reserved);
    }

    [Fact]
    public async Task A_hello_dripped_a_byte_at_a_time_is_dropped_at_the_handshake_deadline()
    {
        var clock = new VirtualClock();
        var dropped = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var loop = new Loopback(new DestinationOptions { Time = clock, HandshakeTimeout = TimeSpan.FromSeconds(10) });
        loop.Listener.Dropped += line => dropped.TrySetResult(line);
        using var client = new TcpClient("127.0.0.1", loop.Port) { NoDelay = true };
        var s = client.GetStream();
        s.ReadTimeout = (int)Bound.TotalMilliseconds;
        // The deadline runs from the accept: wait until the listener armed it, then drip.
        Wait.Until(() => clock.ArmedTimers == 1);
        var buf = new byte[512];
        byte[] frame = FrameWriter.Encode(FrameType.Hello, buf.AsSpan(0, Hello("drip", 32 * MiB).Write(buf)));
        for (int i = 0; i < 9; i++)
        {
            s.Write(frame.AsSpan(i, 1));
            clock.Advance(TimeSpan.FromSeconds(1));
        }
        Assert.Equal(0, loop.Listener.Handshakes.Expired); // 9 s: still within the deadline
        s.Write(frame.AsSpan(9, 1));
        clock.Advance(TimeSpan.FromSeconds(1));
        string line = await dropped.Task.WaitAsync(Bound);
        Assert.Matches(@"^connection from 127\.0\.0\.1:\d+ dropped: its handshake \(TLS and first frame\) was not done within the deadline of 10 s$", line);
        Assert.Equal(0, ReadToEnd(s)); // closed without an answer
        Assert.Equal(1, loop.Listener.Handshakes.Expired);
        Assert.Equal(0, loop.Listener.MemoryBudget.Reserved); // the Hello never got as far as a reservation
    }

    /// <summary>Reads until the peer closes; the bytes read (a reset counts as closed).</summary>
    private static int ReadToEnd(NetworkStream s)
    {
        int total = 0;
        var buf = new byte[256];
        try { for (int n; (n = s.Read(buf)) > 0;) total += n; }
        catch (IOException e) when (e.InnerException is SocketException { SocketErrorCode: SocketError.ConnectionReset }) { }
        return total;
    }

    [Fact]
    public void Connections_beyond_the_handshake_cap_are_closed_at_once_counted_and_logged_once_per_burst()
    {
        var lines = new System.Collections.Concurrent.ConcurrentQueue<string>();
        using var loop = new Loopback(new DestinationOptions { MaxHandshakes = 4, HandshakeTimeout = TimeSpan.FromMinutes(5) });
        loop.Listener.Dropped += lines.Enqueue;
        var idle = Enumerable.Range(0, 4).Select(_ => new TcpClient("127.0.0.1", loop.Port)).ToList();
        try
        {
            Wait.Until(() => loop.Listener.Handshakes.InProgress == 4);
            for (int i = 0; i < 3; i++)
            {
                using var extra = new TcpClient("127.0.0.1", loop.Port);
                var s = extra.GetStream();
                s.ReadTimeout = (int)Bound.TotalMilliseconds;
                Assert.Equal(0, ReadToEnd(s)); // closed at once, long before any deadline
            }
            Assert.Equal(3, loop.Listener.Handshakes.Refused);
            Assert.Equal(new[] { "refusing connections: 4 are in their handshake already (the limit); further refusals are counted" }, lines.ToArray());
        }
        finally
        {
            foreach (var c in idle) c.Dispose();
        }
        // Once the idle ones are gone, a real migration gets through (and the log says so).
        Wait.Until(() => loop.Listener.Handshakes.InProgress == 0);
        // A connection closed before its first frame is reported (a `listen --once` must not wait for it forever).
        Assert.Matches(@"^connection from 127\.0\.0\.1:\d+ ended in its handshake: peer closed the connection$", loop.DestinationFailure().Message);
        using var vm = RunningVm("after-flood");
        Assert.True(loop.Migrate(vm).Source.Verified);
        Assert.Contains("accepting connections again (3 refused so far)", lines);
    }

    [Fact]
    public void A_lost_connection_is_named_as_the_kernel_said_it()
    {
        using var server = new TcpListener(IPAddress.Loopback, 0);
        server.Start();
        int port = ((IPEndPoint)server.LocalEndpoint).Port;

        // Reset: the peer aborts (RST).
        using (var client = new TcpClient("127.0.0.1", port))
        {
            using (var accepted = server.AcceptSocket()) { accepted.LingerState = new LingerOption(true, 0); }
            var s = client.GetStream();
            s.ReadTimeout = (int)Bound.TotalMilliseconds;
            using var reader = new FrameReader(s);
            var e = Assert.Throws<ProtocolException>(() => reader.Read(out _));
            Assert.True(e.LinkFailure);
            Assert.Equal("frame 0 at stream byte 0: connection failed while reading the header: connection reset by the peer (ECONNRESET: its process ended or it aborted the connection)", e.Message);
        }

        // Silence: the socket's read timeout, said as what it is rather than "Connection timed out".
        using (var client = new TcpClient("127.0.0.1", port))
        using (server.AcceptSocket())
        {
            var s = client.GetStream();
            s.ReadTimeout = 200;
            using var reader = new FrameReader(s);
            var e = Assert.Throws<ProtocolException>(() => reader.Read(out _));
            Assert.Equal("frame 0 at stream byte 0: connection failed while reading the header: read timed out: nothing received for 0.2 s (the peer, or the network between, is down or stalled)", e.Message);
        }

        // Refused: nothing listens.
        server.Stop();
        using var vm = RunningVm("nowhere");
        var refused = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions()).MigrateTo("127.0.0.1", port));
        Assert.Equal($"cannot connect to destination 127.0.0.1:{port}: connection refused (ECONNREFUSED: nothing listens on that address and port)", refused.Message);
    }
}
