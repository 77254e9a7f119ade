using System.Net;
using System.Net.Sockets;
using LiveMig.Core;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>Either side refuses a peer that grants or asks for what was never offered.</summary>
public class NegotiationTests
{
    private static readonly TimeSpan Guard = TimeSpan.FromSeconds(30);

    /// <summary>A fake destination: answers the Hello with <paramref name="answer"/>(hello) and returns what the source sent next.</summary>
    private static (Task<FrameType> Next, Task<string> ErrorText, int Port) FakeDestination(Func<HelloMessage, HelloAckMessage> answer)
    {
        var server = new TcpListener(IPAddress.Loopback, 0);
        server.Start();
        var error = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        var next = Task.Run(() =>
        {
            using var _ = server.Server;
            using var client = server.AcceptTcpClient();
            using var s = client.GetStream();
            s.ReadTimeout = (int)Guard.TotalMilliseconds;
            using var r = new FrameReader(s);
            using var w = new FrameWriter(s);
            Assert.Equal(FrameType.Hello, r.Read(out var payload));
            Span<byte> buf = stackalloc byte[64];
            w.Send(FrameType.HelloAck, buf[..answer(HelloMessage.Parse(payload)).Write(buf)]);
            var type = r.Read(out payload);
            error.TrySetResult(type == FrameType.Error ? ErrorMessage.Parse(payload).Text : "");
            return type;
        });
        return (next, error.Task, ((IPEndPoint)server.LocalEndpoint).Port);
    }

    private static BuiltInVm RunningVm()
    {
        var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 16L << 20, Workload = "random:rate=2000", Fill = MemoryFill.Mixed });
        vm.Start();
        return vm;
    }

    [Theory]
    [InlineData(MigrationStrategy.PreCopy)]
    [InlineData(MigrationStrategy.PostCopy)]
    public async Task A_helloack_granting_capabilities_the_source_never_offered_is_refused(MigrationStrategy strategy)
    {
        var (next, errorText, port) = FakeDestination(h => new HelloAckMessage(ProtocolVersion.Version, h.Requested | Capabilities.Lz4 | Capabilities.MultiStream));
        using var vm = RunningVm();
        var e = Assert.Throws<MigrationFailedException>(() => Migrations.MigrateTo(vm, new MigrationOptions { Strategy = strategy, IoTimeout = Guard }, null, "127.0.0.1", port));
        Assert.Contains("destination's HelloAck grants capabilities this source never offered: Lz4, MultiStream", e.Message);
        Assert.Equal(FrameType.Error, await next.WaitAsync(Guard)); // the destination is told why
        Assert.Contains("never offered", await errorText.WaitAsync(Guard));
        Assert.Equal(VmRunState.Running, vm.State);
    }

    [Fact]
    public async Task A_helloack_choosing_a_version_the_source_never_offered_is_refused()
    {
        var (next, _, port) = FakeDestination(h => new HelloAckMessage(7, h.Requested));
        using var vm = RunningVm();
        var e = Assert.Throws<MigrationFailedException>(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = Guard }).MigrateTo("127.0.0.1", port));
        Assert.Equal($"destination chose protocol version 7, this source offered {ProtocolVersion.MinSupported}..{ProtocolVersion.Version}", e.Message);
        Assert.Equal(FrameType.Error, await next.WaitAsync(Guard));
        Assert.Equal(VmRunState.Running, vm.State);
    }

    private static HelloMessage Hello(Capabilities requested, Capabilities required) =>
        new(ProtocolVersion.Version, ProtocolVersion.MinSupported, requested, required, 16L << 20, GuestMemory.PageSize, 1, Guid.NewGuid(), "vm", BuiltInVm.KindName);

    /// <summary>Sends <paramref name="frames"/> to a listener and returns the Error text it answers with.</summary>
    private static string ErrorFrom(Loopback loop, Action<FrameWriter, FrameReader> frames)
    {
        using var client = new TcpClient("127.0.0.1", loop.Port) { NoDelay = true };
        using var s = client.GetStream();
        s.ReadTimeout = (int)Guard.TotalMilliseconds;
        using var w = new FrameWriter(s);
        using var r = new FrameReader(s);
        frames(w, r);
        FrameType type;
        ReadOnlySpan<byte> payload;
        while ((type = r.Read(out payload)) != FrameType.Error) Assert.Equal(FrameType.HelloAck, type);
        return ErrorMessage.Parse(payload).Text;
    }

    private static void SendHello(FrameWriter w, HelloMessage hello)
    {
        Span<byte> buf = stackalloc byte[512];
        w.Send(FrameType.Hello, buf[..hello.Write(buf)]);
    }

    [Fact]
    public void A_hello_requiring_what_it_does_not_request_is_refused()
    {
        using var loop = new Loopback();
        string text = ErrorFrom(loop, (w, _) => SendHello(w, Hello(Capabilities.Raw | Capabilities.ZeroPages, Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Lz4)));
        Assert.Equal("refused: the Hello requires capabilities it does not request: Lz4", text);
        Assert.Equal(text, loop.DestinationFailure().Message);
    }

    [Fact]
    public void Post_copy_preamble_sync_before_any_round_is_acknowledged()
    {
        // Pure post-copy's Sync(-1): the destination provisions at it (not at PostCopyStart, in the pause) and says so.
        using var loop = new Loopback();
        using var client = new TcpClient("127.0.0.1", loop.Port) { NoDelay = true };
        using var s = client.GetStream();
        s.ReadTimeout = (int)Guard.TotalMilliseconds;
        using var w = new FrameWriter(s);
        using var r = new FrameReader(s);
        var caps = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.PostCopy | Capabilities.RoundSync;
        SendHello(w, Hello(caps, caps));
        Assert.Equal(FrameType.HelloAck, r.Read(out _));
        Span<byte> buf = stackalloc byte[8];
        w.Send(FrameType.Sync, buf[..new SyncMessage(SyncMessage.BeforeRounds).Write(buf)]);
        Assert.Equal(FrameType.SyncAck, r.Read(out var payload));
        Assert.Equal(SyncMessage.BeforeRounds, SyncMessage.Parse(payload, "SyncAck").Round);
    }

    [Fact]
    public void Extents_without_the_extents_capability_are_refused()
    {
        using var loop = new Loopback();
        string text = ErrorFrom(loop, (w, _) =>
        {
            SendHello(w, Hello(Capabilities.Raw | Capabilities.ZeroPages, Capabilities.Raw | Capabilities.ZeroPages));
            w.Send(FrameType.Extents, new byte[8]);
        });
        Assert.Equal("Extents (frame 1) without the Extents capability", text);
    }

    [Fact]
    public void A_handshake_frame_is_sent_at_once_and_its_bytes_are_charged_to_the_cap()
    {
        var clock = new VirtualClock();
        var limiter = new RateLimiter(100, clock); // 100 B/s: a 116-byte frame would wait over a second
        using var w = new FrameWriter(new MemoryStream(), limiter, clock);
        w.SendNow(FrameType.Attach, new byte[100]);
        Assert.Equal(TimeSpan.Zero, clock.Elapsed);
        // The next frame pays for both: the cap holds on average.
        w.Send(FrameType.Sync, new byte[84]);
        Assert.Equal(2.16, clock.Elapsed.TotalSeconds, 2);
    }
}
