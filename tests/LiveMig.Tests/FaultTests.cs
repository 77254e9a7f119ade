using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Transport;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// Bad input and faults. The destination gets garbage, truncated, oversized, out-of-order or
/// corrupted frames (from a scripted byte stream or a real socket) and must fail with a one-line
/// error naming the problem, tell the source, and keep no partial VM. The source loses its
/// connection, its destination, or a byte in flight and must fail clearly with its VM running.
/// </summary>
public partial class FaultTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Guard = TimeSpan.FromSeconds(30);

    // ---- destination: hostile or broken input ---------------------------------------------

    [Fact]
    public void Fault_garbage_bytes_are_not_a_livemig_stream()
    {
        var bytes = new byte[4096];
        new Random(1).NextBytes(bytes);
        BinaryPrimitives.WriteUInt32LittleEndian(bytes, 0xDEADBEEF);
        var (e, _) = ReceiveFails(bytes, vmName: null);
        Assert.Contains("frame 0 at stream byte 0", e.Message);
        Assert.Contains("bad magic 0xDEADBEEF", e.Message);
    }

    [Fact]
    public void Fault_garbage_after_a_valid_hello_names_the_frame_and_offset()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name));
        long at = s.Offset;
        var junk = new byte[1000];
        new Random(2).NextBytes(junk);
        junk[0] = 0x00;
        s.Raw(junk);
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Contains($"frame 1 at stream byte {at}: bad magic", e.Message);
        Assert.Equal(FrameType.HelloAck, replies[0].Type);
        Assert.Equal(ErrorMessage.BadStream, replies[^1].Error!.Value.Code);
    }

    [Fact]
    public void Fault_frame_cut_mid_payload_then_eof()
    {
        string name = NewName();
        long cutAt;
        byte[] input;
        {
            using var probe = new Script();
            probe.Hello(Hello(name));
            probe.RoundStart(0);
            cutAt = probe.Offset + FrameFormat.HeaderSize + 5000; // inside the PageBatch payload
        }
        using (var s = new Script(new FaultPlan { TruncateAfter = cutAt }))
        {
            s.Hello(Hello(name));
            s.RoundStart(0);
            s.Pages(0, Raw(0), Raw(1), Raw(2));
            s.RoundEnd(0);
            Assert.True(s.Fault!.Triggered);
            input = s.Bytes();
        }
        Assert.Equal(cutAt, input.Length);
        var (e, _) = ReceiveFails(input, name);
        Assert.Contains("frame 2 at stream byte", e.Message);
        Assert.Contains("peer closed the connection in the middle of the PageBatch payload", e.Message);
        Assert.Contains($"of {3 * (PageBatchWriter.EntryHeaderSize + GuestMemory.PageSize) + PageBatchWriter.BatchHeaderSize} bytes", e.Message);
    }

    [Theory]
    [InlineData(FrameType.PageBatch, 1u << 30)]
    [InlineData(FrameType.PageBatch, uint.MaxValue)]
    [InlineData(FrameType.VmState, (uint)VmStateChunks.MaxPayload + 1)]
    [InlineData(FrameType.RoundEnd, 70_000u)]
    public void Fault_oversized_length_fails_before_allocating(FrameType type, uint length)
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name));
        s.RoundStart(0);
        var header = new byte[FrameFormat.HeaderSize];
        BinaryPrimitives.WriteUInt32LittleEndian(header, FrameFormat.Magic);
        header[4] = (byte)type;
        BinaryPrimitives.WriteUInt32LittleEndian(header.AsSpan(8), length);
        s.Raw(header); // and no payload: a reader that trusted the length would report EOF instead

        long allocated0 = GC.GetAllocatedBytesForCurrentThread();
        var (e, _) = ReceiveFails(s.Bytes(), name);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - allocated0;

        Assert.Contains($"{type} payload of {length} bytes exceeds the limit of {FrameFormat.MaxPayload(type)}", e.Message);
        Assert.Contains("frame 2 at stream byte", e.Message);
        Assert.True(allocated < 32L << 20, $"receiving allocated {allocated} bytes");
    }

    /// <summary>A version-1 source's Hello ends after the VM name (no kind): it is refused by the version check, naming both ranges.</summary>
    [Fact]
    public void Fault_version_1_hello_without_a_vm_kind_is_refused_by_the_version_check()
    {
        string name = NewName();
        var v1 = Hello(name) with { MaxVersion = 1, MinVersion = 1 };
        var payload = new byte[512];
        int n = v1.Write(payload) - (2 + BuiltInVm.KindName.Length); // cut the kind off: the version-1 layout
        using var s = new Script();
        s.Frame(FrameType.Hello, payload.AsSpan(0, n));
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Contains($"protocol version mismatch: source speaks 1..1, destination {ProtocolVersion.MinSupported}..{ProtocolVersion.Version}", e.Message);
        Assert.Equal(ErrorMessage.Refused, Assert.Single(replies).Error!.Value.Code);
    }

    [Fact]
    public void Fault_unknown_vm_kind_is_refused_naming_the_kind_and_the_supported_kinds()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name) with { VmKind = "qemu" });
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Equal("refused: VM kind 'qemu' is not supported here (supported: builtin)", e.Message);
        Assert.Equal(ErrorMessage.Refused, Assert.Single(replies).Error!.Value.Code);
    }

    [Theory]
    [InlineData("bad\nkind", "Hello: vmKind byte 3 is 0x0a")]
    [InlineData("", "Hello: vmKind is 0 bytes")]
    [InlineData("0123456789abcdef0123456789abcdefX", "Hello: vmKind is 33 bytes")]
    public void Fault_malformed_vm_kind_is_a_protocol_error_that_does_not_echo_it(string kind, string expected)
    {
        string name = NewName();
        var payload = new byte[512];
        int n = Hello(name).Write(payload) - (2 + BuiltInVm.KindName.Length);
        var w = new SpanWriter(payload.AsSpan(n));
        w.U16((ushort)kind.Length);
        w.Bytes(System.Text.Encoding.ASCII.GetBytes(kind));
        using var s = new Script();
        s.Frame(FrameType.Hello, payload.AsSpan(0, n + w.Position));
        var (e, _) = ReceiveFails(s.Bytes(), name);
        Assert.StartsWith(expected, e.Message);
        Assert.Throws<ArgumentException>(() => (Hello(name) with { VmKind = kind }).Write(new byte[512]));
    }

    [Theory]
    [InlineData((ushort)99, (ushort)99)]
    [InlineData((ushort)0, (ushort)0)]
    public void Fault_wrong_protocol_version_is_refused_naming_both_ranges(ushort max, ushort min)
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name) with { MaxVersion = max, MinVersion = min });
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Contains("protocol version mismatch", e.Message);
        Assert.Contains($"source speaks {min}..{max}", e.Message);
        Assert.Contains($"destination {ProtocolVersion.MinSupported}..{ProtocolVersion.Version}", e.Message);
        var error = Assert.Single(replies).Error!.Value;
        Assert.Equal(ErrorMessage.Refused, error.Code);
    }

    [Theory]
    [InlineData("payload")]
    [InlineData("type byte")]
    public void Fault_checksum_mismatch_is_caught(string where)
    {
        string name = NewName();
        long corruptAt;
        {
            using var probe = new Script();
            probe.Hello(Hello(name));
            probe.RoundStart(0);
            // A byte of the first raw page's data, or the type byte of the PageBatch header.
            corruptAt = where == "payload" ? probe.Offset + FrameFormat.HeaderSize + 8 + 8 + 100 : probe.Offset + 4;
        }
        using var s = new Script(new FaultPlan { CorruptAt = corruptAt, CorruptMask = where == "payload" ? (byte)0x01 : (byte)0x07 });
        s.Hello(Hello(name));
        s.RoundStart(0);
        s.Pages(0, Raw(0), Raw(1));
        s.RoundEnd(0);
        Assert.True(s.Fault!.Triggered);
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Contains("frame 2 at stream byte", e.Message);
        Assert.Contains("checksum mismatch", e.Message);
        Assert.Equal(e.Message, replies[^1].Error!.Value.Text);
    }

    [Theory]
    [InlineData(256u)]
    [InlineData(uint.MaxValue)]
    public void Fault_page_outside_memory(uint page)
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name, memory: 1 << 20));
        s.RoundStart(0);
        s.Pages(0, Raw(3), Raw(page));
        var (e, _) = ReceiveFails(s.Bytes(), name);
        Assert.Contains($"PageBatch (frame 2) entry 1: page {page} is outside guest memory of 256 pages", e.Message);
    }

    [Fact]
    public void Fault_unknown_page_encoding()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name));
        s.RoundStart(0);
        s.Pages(0, new Entry(5, 7, []));
        var (e, _) = ReceiveFails(s.Bytes(), name);
        Assert.Contains("PageBatch (frame 2) entry 0: unknown page encoding 7", e.Message);
    }

    [Theory]
    [InlineData("PageBatch before Hello", "unexpected PageBatch (frame 0) in state AwaitHello")]
    [InlineData("PageBatch before RoundStart", "PageBatch (frame 1) before any RoundStart")]
    [InlineData("Commit before Prepare", "unexpected Commit (frame 3) in state Live")]
    [InlineData("Commit after VmState", "unexpected Commit (frame 5) in state HaveState")]
    [InlineData("Prepare before VmState", "unexpected Prepare (frame 3) in state StopAndCopy")]
    [InlineData("second Hello", "unexpected Hello (frame 1) in state Live")]
    [InlineData("round skipped", "RoundStart (frame 3): round 2 after round 0")]
    [InlineData("batch of another round", "PageBatch (frame 2) of round 4 inside round 0")]
    [InlineData("VmState during live rounds", "unexpected VmState (frame 2) in state Live")]
    public void Fault_frames_out_of_order(string scenario, string expected)
    {
        string name = NewName();
        using var s = new Script();
        switch (scenario)
        {
            case "PageBatch before Hello":
                s.Pages(0, Raw(0));
                break;
            case "PageBatch before RoundStart":
                s.Hello(Hello(name)); s.Pages(0, Raw(0));
                break;
            case "Commit before Prepare":
                s.Hello(Hello(name)); s.RoundStart(0); s.Pages(0, Raw(0)); s.Frame(FrameType.Commit, []);
                break;
            case "Commit after VmState":
                s.Hello(Hello(name)); s.RoundStart(0, final: true); s.Pages(0, Raw(0)); s.RoundEnd(0); s.VmState([1, 2, 3]); s.Frame(FrameType.Commit, []);
                break;
            case "Prepare before VmState":
                s.Hello(Hello(name)); s.RoundStart(0, final: true); s.RoundEnd(0); s.Prepare();
                break;
            case "second Hello":
                s.Hello(Hello(name)); s.Hello(Hello(name));
                break;
            case "round skipped":
                s.Hello(Hello(name)); s.RoundStart(0); s.RoundEnd(0); s.RoundStart(2);
                break;
            case "batch of another round":
                s.Hello(Hello(name)); s.RoundStart(0); s.Pages(4, Raw(0));
                break;
            case "VmState during live rounds":
                s.Hello(Hello(name)); s.RoundStart(0); s.VmState([1, 2, 3]);
                break;
        }
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Contains(expected, e.Message);
        Assert.Equal(ErrorMessage.BadStream, replies[^1].Error!.Value.Code);
    }

    [Theory]
    [InlineData("claim over the limit", "VmState (frame 3) announces 1024.00 GiB of VM state, over this destination's limit of 256.0 MiB")]
    [InlineData("empty claim", "VmState (frame 3) announces an empty VM state")]
    [InlineData("truncated", "VM state truncated: Prepare (frame 4) after 1048576 of 2097152 bytes")]
    [InlineData("repeated chunk", "VmState (frame 4, offset 0) out of order: 1048576 of 2097152 bytes had arrived")]
    [InlineData("chunk skipped", "VmState (frame 3, offset 1048576) out of order: 0 of 3145728 bytes had arrived")]
    [InlineData("other total", "VmState (frame 4, offset 1048576) claims a state of 9 bytes, the first chunk 2097152")]
    [InlineData("overlong", "VmState (frame 3, offset 0): 11 bytes run past the state's 10 bytes")]
    [InlineData("last too early", "VmState (frame 3, offset 0): last chunk ends at 5 of 10 bytes (state truncated)")]
    [InlineData("end not marked", "VmState (frame 3, offset 0) completes the 10 bytes but is not marked last")]
    [InlineData("short header", "VmState (frame 3): 16 bytes is shorter than its 17-byte header")]
    [InlineData("after the last", "unexpected VmState (frame 4) in state HaveState")]
    public void Fault_bad_vm_state_chunks_fail_clearly_with_bounded_memory(string scenario, string expected)
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name));
        s.RoundStart(0, final: true);
        s.RoundEnd(0);
        const int M = VmStateChunks.ChunkBytes;
        switch (scenario)
        {
            case "claim over the limit": s.Frame(FrameType.VmState, Chunk(1UL << 40, 0, 0, 1)); break;
            case "empty claim": s.Frame(FrameType.VmState, Chunk(0, 0, 1, 0)); break;
            case "truncated": s.Frame(FrameType.VmState, Chunk(2 * M, 0, 0, M)); s.Prepare(); break;
            case "repeated chunk": s.Frame(FrameType.VmState, Chunk(2 * M, 0, 0, M)); s.Frame(FrameType.VmState, Chunk(2 * M, 0, 0, M)); break;
            case "chunk skipped": s.Frame(FrameType.VmState, Chunk(3 * M, M, 0, M)); break;
            case "other total": s.Frame(FrameType.VmState, Chunk(2 * M, 0, 0, M)); s.Frame(FrameType.VmState, Chunk(9, M, 1, 9)); break;
            case "overlong": s.Frame(FrameType.VmState, Chunk(10, 0, 1, 11)); break;
            case "last too early": s.Frame(FrameType.VmState, Chunk(10, 0, 1, 5)); break;
            case "end not marked": s.Frame(FrameType.VmState, Chunk(10, 0, 0, 10)); break;
            case "short header": s.Frame(FrameType.VmState, Chunk(10, 0, 0, 0)[..16]); break;
            case "after the last": s.VmState([1, 2, 3]); s.VmState([1, 2, 3]); break;
        }
        long allocated0 = GC.GetAllocatedBytesForCurrentThread();
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        long allocated = GC.GetAllocatedBytesForCurrentThread() - allocated0;
        Assert.Equal(expected, e.Message);
        Assert.Equal(ErrorMessage.BadStream, replies[^1].Error!.Value.Code);
        Assert.True(allocated < 24L << 20, $"receiving allocated {allocated:N0} bytes");
    }

    /// <summary>A VmState payload: total, offset, last flag, then <paramref name="bytes"/> bytes.</summary>
    private static byte[] Chunk(ulong total, ulong offset, byte last, int bytes)
    {
        var p = new byte[VmStateChunks.HeaderSize + bytes];
        BinaryPrimitives.WriteUInt64LittleEndian(p, total);
        BinaryPrimitives.WriteUInt64LittleEndian(p.AsSpan(8), offset);
        p[16] = last;
        return p;
    }

    [Fact]
    public void Fault_memory_above_the_destination_limit_is_refused_before_allocating()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name, memory: 64L << 20));
        var (e, replies) = ReceiveFails(s.Bytes(), name, new DestinationOptions { MaxMemoryBytes = 16L << 20 });
        Assert.Contains("memory size 64.0 MiB exceeds this destination's limit of 16.0 MiB", e.Message);
        var error = Assert.Single(replies).Error!.Value;
        Assert.Equal(ErrorMessage.Refused, error.Code);
        Assert.Contains("exceeds this destination's limit", error.Text);
    }

    /// <summary>The longest name the protocol carries must not break the destination's memory allocation.</summary>
    [Fact]
    public void Fault_longest_vm_name_is_accepted_and_its_memory_discarded()
    {
        string name = NewName() + new string('n', HelloMessage.MaxNameBytes - 13);
        Assert.Equal(HelloMessage.MaxNameBytes, name.Length);
        using var s = new Script();
        s.Hello(Hello(name));
        long end = s.Offset;
        var (e, replies) = ReceiveFails(s.Bytes(), name[..40]);
        Assert.Equal($"frame 1 at stream byte {end}: peer closed the connection", e.Message);
        Assert.Equal(FrameType.HelloAck, replies[0].Type);
    }

    [Fact]
    public void Fault_garbage_vm_state_is_rejected_at_prepare()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name));
        s.RoundStart(0, final: true);
        s.Pages(0, Raw(0));
        s.RoundEnd(0);
        s.VmState([1, 2, 3, 4, 5, 6, 7, 8]);
        s.Prepare();
        var (e, _) = ReceiveFails(s.Bytes(), name);
        Assert.Contains("VM state: bad magic", e.Message);
    }

    /// <summary>The worst moment to vanish: the VM is rebuilt and loaded, waiting for Commit.</summary>
    [Fact]
    public void Fault_source_vanishing_after_prepare_discards_the_loaded_vm()
    {
        string name = NewName();
        byte[] state;
        using (var template = BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = 1 << 20, Vcpus = 2, Workload = "random:rate=1000" }))
            state = template.SaveState();
        using var s = new Script();
        s.Hello(Hello(name));
        s.RoundStart(0, final: true);
        s.Pages(0, Raw(0), Raw(1));
        s.RoundEnd(0);
        s.VmState(state);
        s.Prepare();
        long end = s.Offset;
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Equal($"frame 6 at stream byte {end}: peer closed the connection", e.Message);
        Assert.Equal([FrameType.HelloAck, FrameType.Ready, FrameType.Error], replies.Select(r => r.Type));
    }

    [Fact]
    public void Fault_silent_source_times_out_instead_of_hanging()
    {
        string name = NewName();
        using var server = new TcpListener(IPAddress.Loopback, 0);
        server.Start();
        using var client = new TcpClient();
        client.Connect(IPAddress.Loopback, ((IPEndPoint)server.LocalEndpoint).Port);
        using var accepted = server.AcceptTcpClient();
        using var clientStream = client.GetStream();
        // Say hello, take the ack, then go quiet with the connection open.
        using (var w = new FrameWriter(clientStream))
        {
            Span<byte> buf = stackalloc byte[512];
            w.Send(FrameType.Hello, buf[..Hello(name).Write(buf)]);
        }

        var sw = Stopwatch.StartNew();
        var receive = Task.Run(() => new IncomingMigration(new DestinationOptions { IoTimeout = TimeSpan.FromMilliseconds(300) }).Receive(accepted.GetStream()));
        Assert.True(((IAsyncResult)receive).AsyncWaitHandle.WaitOne(Guard), "destination hung on a silent source");
        var e = Assert.IsType<MigrationFailedException>(receive.Exception?.InnerException);
        AssertFailureReport(e, "destination");
        Assert.InRange(sw.Elapsed, TimeSpan.FromMilliseconds(250), TimeSpan.FromSeconds(5));
        Assert.Contains("frame 1 at stream byte", e.Message);
        Assert.Contains("timed out", e.Message);
        AssertNoIncomingMemory(name);
        using var r = new FrameReader(clientStream);
        Assert.Equal(FrameType.HelloAck, r.Read(out _));
    }

    // ---- source: the connection or the destination fails ----------------------------------

    [Theory]
    [InlineData("drop", 10L)]
    [InlineData("drop", 3L << 20)]
    [InlineData("truncate", 3L << 20)]
    public void Fault_connection_lost_mid_stream_leaves_the_source_vm_running(string mode, long after)
    {
        using var loop = new Loopback();
        using var vm = RunningVm();
        var plan = mode == "drop" ? new FaultPlan { DropAfter = after } : new FaultPlan { TruncateAfter = after };
        var options = new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) };

        using var client = new TcpClient { NoDelay = true };
        client.Connect(IPAddress.Loopback, loop.Port);
        using var stream = new FaultInjectingStream(client.GetStream(), plan);
        var e = RunFails(() => new PreCopyMigration(vm, options).Run(stream));
        Assert.True(stream.Triggered);

        if (mode == "drop") Assert.Contains($"connection to the destination failed: fault injection: connection dropped after {after} bytes", e.Message);
        // Truncated: the destination saw the stream end, said so, and the source read it at its next read.
        else Assert.Contains("peer closed the connection in the middle of", e.Message);

        AssertUnharmed(vm);
        var failure = loop.DestinationFailure();
        AssertFailureReport(failure, "destination");
        Assert.Contains("peer closed the connection", failure.Message);
        Assert.Empty(loop.Listener.Vms);
        AssertNoIncomingMemory(vm.Name);
    }

    [Fact]
    public void Fault_byte_corrupted_in_flight_is_a_checksum_mismatch_at_the_destination()
    {
        using var loop = new Loopback();
        using var vm = RunningVm();
        using var client = new TcpClient { NoDelay = true };
        client.Connect(IPAddress.Loopback, loop.Port);
        using var stream = new FaultInjectingStream(client.GetStream(), new FaultPlan { CorruptAt = (3L << 20) + 123 });
        var e = RunFails(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) }).Run(stream));
        Assert.True(stream.Triggered);

        var failure = loop.DestinationFailure();
        AssertFailureReport(failure, "destination");
        Assert.Contains("checksum mismatch in PageBatch frame", failure.Message);
        // The source says what the destination said.
        Assert.Contains("destination", e.Message);
        Assert.Contains(failure.Message, e.Message);
        AssertUnharmed(vm);
        Assert.Empty(loop.Listener.Vms);
        AssertNoIncomingMemory(vm.Name);
    }

    [Fact]
    public void Fault_destination_dying_mid_stream_fails_the_source_clearly()
    {
        using var vm = RunningVm();
        using var fake = new FakeDestination(s =>
        {
            AcceptHello(s);
            var sink = new byte[64 << 10];
            long got = 0;
            while (got < 2 << 20)
            {
                int n = s.Read(sink);
                if (n == 0) break;
                got += n;
            }
            // ...and dies: the socket closes with unread data.
        });
        var e = RunFails(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) }).MigrateTo("127.0.0.1", fake.Port));
        Assert.True(e.Message.Contains("connection to the destination failed", StringComparison.Ordinal) || e.Message.Contains("peer closed the connection", StringComparison.Ordinal), e.Message);
        AssertUnharmed(vm);
    }

    [Fact]
    public void Fault_destination_that_stops_reading_times_out_instead_of_hanging()
    {
        using var vm = RunningVm();
        using var release = new ManualResetEventSlim();
        using var fake = new FakeDestination(s => { AcceptHello(s); release.Wait(Guard); });
        var sw = Stopwatch.StartNew();
        var run = Task.Run(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromMilliseconds(300) }).MigrateTo("127.0.0.1", fake.Port));
        Assert.True(((IAsyncResult)run).AsyncWaitHandle.WaitOne(Guard), "source hung on a destination that stopped reading");
        release.Set();
        var e = Assert.IsType<MigrationFailedException>(run.Exception?.InnerException);
        AssertFailureReport(e, "source");
        Assert.Contains("timed out", e.Message);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5), $"took {sw.Elapsed}");
        AssertUnharmed(vm);
    }

    [Fact]
    public void Fault_silent_destination_times_out_through_a_wrapped_stream()
    {
        using var vm = RunningVm();
        using var release = new ManualResetEventSlim();
        using var fake = new FakeDestination(_ => release.Wait(Guard));
        using var client = new TcpClient { NoDelay = true };
        client.Connect(IPAddress.Loopback, fake.Port);
        using var stream = new FaultInjectingStream(client.GetStream(), new FaultPlan());
        var sw = Stopwatch.StartNew();
        var run = Task.Run(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromMilliseconds(300) }).Run(stream));
        bool finished = ((IAsyncResult)run).AsyncWaitHandle.WaitOne(Guard);
        release.Set();
        if (!finished) client.Dispose(); // unblock the source before failing the test
        Assert.True(finished, "source hung on a silent destination");
        var e = Assert.IsType<MigrationFailedException>(run.Exception?.InnerException);
        AssertFailureReport(e, "source");
        Assert.Contains("timed out", e.Message);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5), $"took {sw.Elapsed}");
        AssertUnharmed(vm);
    }

    [Fact]
    public void Fault_destination_answering_an_unknown_version_is_rejected_by_the_source()
    {
        using var vm = RunningVm();
        using var fake = new FakeDestination(s =>
        {
            using var r = new FrameReader(s);
            Assert.Equal(FrameType.Hello, r.Read(out _));
            using var w = new FrameWriter(s);
            Span<byte> buf = stackalloc byte[64];
            w.Send(FrameType.HelloAck, buf[..new HelloAckMessage(99, Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Verify).Write(buf)]);
            try { while (r.Read(out _) != FrameType.Error) { } } catch (ProtocolException) { }
        });
        var e = RunFails(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) }).MigrateTo("127.0.0.1", fake.Port));
        Assert.Contains("protocol version 99", e.Message);
        AssertUnharmed(vm);
    }

    [Fact]
    public void Fault_nobody_listening_is_a_clear_cannot_connect()
    {
        using var vm = RunningVm();
        var probe = new TcpListener(IPAddress.Loopback, 0);
        probe.Start();
        int port = ((IPEndPoint)probe.LocalEndpoint).Port;
        probe.Stop();
        var e = RunFails(() => new PreCopyMigration(vm, new MigrationOptions()).MigrateTo("127.0.0.1", port));
        Assert.StartsWith($"cannot connect to destination 127.0.0.1:{port}: ", e.Message);
        Assert.Contains("refused", e.Message);
        AssertUnharmed(vm);
    }

    [Fact]
    public void Fault_memory_above_the_destination_limit_is_refused_and_the_source_says_why()
    {
        using var loop = new Loopback(new DestinationOptions { MaxMemoryBytes = 16L << 20 });
        using var vm = RunningVm();
        var e = RunFails(() => new PreCopyMigration(vm, new MigrationOptions()).MigrateTo("127.0.0.1", loop.Port));
        Assert.Contains("destination refused", e.Message);
        Assert.Contains("memory size 32.0 MiB exceeds this destination's limit of 16.0 MiB", e.Message);
        AssertUnharmed(vm);
        Assert.Contains("exceeds this destination's limit", loop.DestinationFailure().Message);
        Assert.Empty(loop.Listener.Vms);
    }

    /// <summary>
    /// One page arrives different but with a valid checksum (a bug-free wire, a buggy codec):
    /// only the memory hash can catch it. The source has already paused: it must resume.
    /// </summary>
    [Fact]
    public void Fault_verification_failure_resumes_the_paused_source()
    {
        using var loop = new Loopback();
        using var vm = RunningVm();
        using var client = new TcpClient { NoDelay = true };
        client.Connect(IPAddress.Loopback, loop.Port);
        using var stream = new PageTamperingStream(client.GetStream());
        var e = RunFails(() => new PreCopyMigration(vm, new MigrationOptions { IoTimeout = TimeSpan.FromSeconds(5) }).Run(stream));
        Assert.True(stream.TamperedPage >= 0);

        Assert.Contains("verification failed", e.Message);
        Assert.Contains("differs from the source's", e.Message);
        Assert.False(e.Report.Verified);
        Assert.True(e.Report.Rounds.Count >= 2 && e.Report.Rounds[^1].Final, "the source should have reached stop-and-copy");
        AssertUnharmed(vm);
        var failure = loop.DestinationFailure();
        AssertFailureReport(failure, "destination");
        Assert.Contains("verification failed", failure.Message);
        Assert.False(failure.Report.Verified);
        Assert.Empty(loop.Listener.Vms);
        AssertNoIncomingMemory(vm.Name);
    }

    // ---- the fault-injection stream itself ---------------------------------------------------

    [Fact]
    public void Fault_injecting_stream_does_exactly_what_its_plan_says()
    {
        byte[] data = Enumerable.Range(0, 100).Select(i => (byte)i).ToArray();

        // Drop: exactly N bytes get through, then this and every later call fails.
        var sink = new MemoryStream();
        var drop = new FaultInjectingStream(sink, new FaultPlan { DropAfter = 130 });
        drop.Write(data);
        var ex = Assert.Throws<IOException>(() => drop.Write(data));
        Assert.Contains("dropped after 130 bytes", ex.Message);
        Assert.True(drop.Triggered);
        Assert.Equal(data.Concat(data.Take(30)), sink.ToArray());
        Assert.Throws<IOException>(() => drop.Write(data));
        Assert.Throws<IOException>(() => drop.ReadByte());

        // Truncate: N bytes get through, the rest vanish without an error.
        sink = new MemoryStream();
        var cut = new FaultInjectingStream(sink, new FaultPlan { TruncateAfter = 150 });
        cut.Write(data); cut.Write(data); cut.Write(data);
        Assert.Equal(data.Concat(data.Take(50)), sink.ToArray());
        Assert.Equal(300, cut.BytesWritten);

        // Corrupt: one byte flipped on the wire, the caller's buffer untouched.
        sink = new MemoryStream();
        var flip = new FaultInjectingStream(sink, new FaultPlan { CorruptAt = 142, CorruptMask = 0x80 });
        flip.Write(data); Assert.False(flip.Triggered);
        flip.Write(data); flip.Write(data);
        byte[] wire = sink.ToArray();
        Assert.Equal(300, wire.Length);
        Assert.Equal((byte)(42 ^ 0x80), wire[142]);
        Assert.Equal(42, data[42]);
        wire[142] ^= 0x80;
        Assert.Equal(data.Concat(data).Concat(data), wire);

        // Delay: only the write that carries offset K waits, once.
        sink = new MemoryStream();
        var slow = new FaultInjectingStream(sink, new FaultPlan { DelayAt = 150, Delay = TimeSpan.FromMilliseconds(200) });
        var sw = Stopwatch.StartNew();
        slow.Write(data);
        Assert.False(slow.Triggered);
        slow.Write(data);
        Assert.True(sw.ElapsedMilliseconds >= 190 && slow.Triggered, $"{sw.ElapsedMilliseconds} ms");
        Assert.Equal(200, sink.Length);

        // Reads pass through.
        var reader = new FaultInjectingStream(new MemoryStream(data), new FaultPlan { CorruptAt = 0 });
        var back = new byte[100];
        reader.ReadExactly(back);
        Assert.Equal(data, back);
    }

    // ---- helpers ------------------------------------------------------------------------------

    private static string NewName() => "f" + Guid.NewGuid().ToString("N")[..12];

    private static HelloMessage Hello(string name, long memory = 1 << 20) => new(
        ProtocolVersion.Version, ProtocolVersion.MinSupported,
        Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Verify, Capabilities.Raw | Capabilities.ZeroPages,
        memory, GuestMemory.PageSize, 2, Guid.NewGuid(), name, BuiltInVm.KindName);

    private readonly record struct Entry(uint Page, byte Encoding, byte[] Data);

    private static Entry Raw(uint page)
    {
        var data = new byte[GuestMemory.PageSize];
        new Random((int)page).NextBytes(data);
        return new Entry(page, (byte)PageEncoding.Raw, data);
    }

    private readonly record struct Reply(FrameType Type, ErrorMessage? Error);

    /// <summary>Runs the destination over <paramref name="input"/>; checks the failure is clean and returns it with what the destination sent back.</summary>
    private (MigrationFailedException Error, List<Reply> Replies) ReceiveFails(byte[] input, string? vmName, DestinationOptions? options = null)
    {
        var stream = new ScriptedStream(input);
        var e = Assert.Throws<MigrationFailedException>(() => new IncomingMigration(options ?? new DestinationOptions()).Receive(stream));
        AssertFailureReport(e, "destination");
        if (vmName is not null) AssertNoIncomingMemory(vmName);

        var replies = new List<Reply>();
        using var r = new FrameReader(new MemoryStream(stream.Written));
        while (r.BytesRead < stream.Written.Length)
        {
            var t = r.Read(out var payload);
            replies.Add(new Reply(t, t == FrameType.Error ? ErrorMessage.Parse(payload) : null));
        }
        // Whatever went wrong, the source was told (last frame) unless the peer was gone anyway.
        Assert.NotEmpty(replies);
        Assert.Equal(FrameType.Error, replies[^1].Type);
        Assert.Contains(e.Message, replies[^1].Error!.Value.Text);
        return (e, replies);
    }

    private MigrationFailedException RunFails(Func<object> migrate)
    {
        var sw = Stopwatch.StartNew();
        var e = Assert.Throws<MigrationFailedException>(migrate);
        AssertFailureReport(e, "source");
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(8), $"failing took {sw.Elapsed}");
        return e;
    }

    private void AssertFailureReport(MigrationFailedException e, string role)
    {
        output.WriteLine($"{role}: {e.Message}");
        Assert.False(string.IsNullOrWhiteSpace(e.Message));
        Assert.DoesNotContain("\n", e.Message);
        Assert.DoesNotContain("\r", e.Message);
        Assert.True(e.Message.Length < 600, e.Message);
        Assert.Equal("failed", e.Report.Outcome);
        Assert.Equal(role, e.Report.Role);
        Assert.Equal(e.Message, e.Report.Error);
    }

    /// <summary>The destination names its guest memory "livemig-in-NAME": no mapping or descriptor of it may remain.</summary>
    private static void AssertNoIncomingMemory(string vmName)
    {
        string tag = "memfd:livemig-in-" + vmName;
        Assert.DoesNotContain(File.ReadLines("/proc/self/maps"), l => l.Contains(tag, StringComparison.Ordinal));
        foreach (string fd in Directory.EnumerateFiles("/proc/self/fd"))
        {
            string? target = null;
            try { target = new FileInfo(fd).LinkTarget; } catch (IOException) { } catch (UnauthorizedAccessException) { }
            Assert.False(target?.Contains(tag, StringComparison.Ordinal) == true, $"{fd} -> {target}");
        }
    }

    private static BuiltInVm RunningVm()
    {
        var vm = BuiltInVm.Create(new VmConfig { Name = NewName(), MemoryBytes = 32L << 20, Workload = "random:rate=5000", Fill = MemoryFill.Mixed, Seed = 7 });
        vm.Start();
        return vm;
    }

    private static void AssertUnharmed(BuiltInVm vm)
    {
        Assert.Equal(VmRunState.Running, vm.State);
        Assert.False(vm.DirtyLog.IsTracking);
        Assert.Equal(0, vm.ThrottleFraction);
        long ops = vm.Operations;
        Assert.True(SpinWait.SpinUntil(() => vm.Operations > ops + 20, TimeSpan.FromSeconds(5)), "the source VM does not run");
    }

    private static void AcceptHello(Stream s)
    {
        using var r = new FrameReader(s);
        Assert.Equal(FrameType.Hello, r.Read(out var payload));
        var hello = HelloMessage.Parse(payload);
        using var w = new FrameWriter(s);
        Span<byte> buf = stackalloc byte[64];
        w.Send(FrameType.HelloAck, buf[..new HelloAckMessage(ProtocolVersion.Version, hello.Requested).Write(buf)]);
    }

    /// <summary>A fake source: frames written by a real <see cref="FrameWriter"/>, optionally through a fault plan.</summary>
    private sealed class Script : IDisposable
    {
        private readonly MemoryStream _bytes = new();
        private readonly FrameWriter _frames;
        private readonly Stream _out;

        public Script(FaultPlan? plan = null)
        {
            _out = plan is null ? _bytes : Fault = new FaultInjectingStream(_bytes, plan);
            _frames = new FrameWriter(_out);
        }

        public FaultInjectingStream? Fault { get; }
        public long Offset => _bytes.Length;
        public byte[] Bytes() => _bytes.ToArray();

        public void Frame(FrameType type, ReadOnlySpan<byte> payload) => _frames.Send(type, payload);
        public void Raw(byte[] bytes) => _out.Write(bytes);

        public void Hello(HelloMessage h)
        {
            Span<byte> b = stackalloc byte[512];
            Frame(FrameType.Hello, b[..h.Write(b)]);
        }

        public void VmState(byte[] state) => VmStateChunks.Send(_frames, state);

        public void RoundStart(int round, bool final = false)
        {
            Span<byte> b = stackalloc byte[16];
            Frame(FrameType.RoundStart, b[..new RoundStartMessage(round, final).Write(b)]);
        }

        public void RoundEnd(int round)
        {
            Span<byte> b = stackalloc byte[64];
            Frame(FrameType.RoundEnd, b[..new RoundEndMessage(round, 0, 0, 0, 0).Write(b)]);
        }

        public void Prepare()
        {
            Span<byte> b = stackalloc byte[64];
            Frame(FrameType.Prepare, b[..new PrepareMessage(false, 0, 0).Write(b)]);
        }

        public void Pages(int round, params Entry[] entries)
        {
            var p = new byte[PageBatchWriter.BatchHeaderSize + entries.Sum(e => PageBatchWriter.EntryHeaderSize + e.Data.Length)];
            BinaryPrimitives.WriteUInt32LittleEndian(p, (uint)round);
            BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(4), (uint)entries.Length);
            int at = PageBatchWriter.BatchHeaderSize;
            foreach (var e in entries)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(p.AsSpan(at), e.Page);
                p[at + 4] = e.Encoding;
                BinaryPrimitives.WriteUInt16LittleEndian(p.AsSpan(at + 6), (ushort)e.Data.Length);
                e.Data.CopyTo(p, at + PageBatchWriter.EntryHeaderSize);
                at += PageBatchWriter.EntryHeaderSize + e.Data.Length;
            }
            Frame(FrameType.PageBatch, p);
        }

        public void Dispose()
        {
            _frames.Dispose();
            _out.Dispose();
        }
    }

    /// <summary>Reads come from a fixed script; writes are collected (a MemoryStream would mix the two).</summary>
    private sealed class ScriptedStream(byte[] input) : Stream
    {
        private readonly MemoryStream _in = new(input, writable: false);
        private readonly MemoryStream _out = new();

        public byte[] Written => _out.ToArray();

        public override int Read(byte[] buffer, int offset, int count) => _in.Read(buffer, offset, count);
        public override int Read(Span<byte> buffer) => _in.Read(buffer);
        public override void Write(byte[] buffer, int offset, int count) => _out.Write(buffer, offset, count);
        public override void Write(ReadOnlySpan<byte> buffer) => _out.Write(buffer);
        public override void Flush() { }
        public override bool CanRead => true;
        public override bool CanWrite => true;
        public override bool CanSeek => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }

    /// <summary>A destination on 127.0.0.1 that behaves as the test says, for one connection.</summary>
    private sealed class FakeDestination : IDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly Task _task;

        public FakeDestination(Action<NetworkStream> behave)
        {
            _listener.Start();
            _task = Task.Run(() =>
            {
                using var client = _listener.AcceptTcpClient();
                using var stream = client.GetStream();
                stream.ReadTimeout = stream.WriteTimeout = (int)Guard.TotalMilliseconds;
                try { behave(stream); }
                catch (IOException) { }
            });
        }

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

        public void Dispose()
        {
            _listener.Stop();
            try { _task.Wait(Guard); } catch (AggregateException) { }
        }
    }

    /// <summary>
    /// Changes one byte of one raw page every time that page is sent, and re-seals the frame's
    /// checksum, so the frame layer cannot notice: only verification can. Relies on
    /// <see cref="FrameWriter"/> writing each frame with exactly one Write call.
    /// </summary>
    private sealed class PageTamperingStream(Stream inner) : LiveMig.Transport.DelegatingStream(inner)
    {
        public long TamperedPage { get; private set; } = -1;


        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (buffer.Length < FrameFormat.HeaderSize || BinaryPrimitives.ReadUInt32LittleEndian(buffer) != FrameFormat.Magic || buffer[4] != (byte)FrameType.PageBatch)
            {
                Inner.Write(buffer);
                return;
            }
            byte[] frame = buffer.ToArray();
            var payload = frame.AsSpan(FrameFormat.HeaderSize);
            uint count = BinaryPrimitives.ReadUInt32LittleEndian(payload[4..]);
            int at = PageBatchWriter.BatchHeaderSize;
            bool changed = false;
            for (uint i = 0; i < count; i++)
            {
                uint page = BinaryPrimitives.ReadUInt32LittleEndian(payload[at..]);
                int length = BinaryPrimitives.ReadUInt16LittleEndian(payload[(at + 6)..]);
                if (payload[at + 4] == (byte)PageEncoding.Raw && (TamperedPage < 0 || TamperedPage == page))
                {
                    TamperedPage = page;
                    payload[at + PageBatchWriter.EntryHeaderSize + 100] ^= 0x5A;
                    changed = true;
                }
                at += PageBatchWriter.EntryHeaderSize + length;
            }
            if (changed)
                BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(12), FrameFormat.PageHashChecksum(payload)!.Value); // a pre-copy source checks its pages by their hashes (capability PageHashCheck)
            Inner.Write(frame);
        }
    }
}
