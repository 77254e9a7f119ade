using System.Collections.Concurrent;
using System.Diagnostics;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>The destination's side of several data streams, driven by scripted connections; the new frames' parsers.</summary>
public partial class FaultTests
{
    private const Capabilities StreamCaps = Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Verify | Capabilities.RoundSync | Capabilities.MultiStream;

    private static HelloMessage StreamHello(string name, long memory = 1 << 20) =>
        Hello(name, memory) with { Requested = StreamCaps, Required = StreamCaps };

    private static Entry Version(uint page, int round)
    {
        var data = new byte[GuestMemory.PageSize];
        new Random((int)page * 131 + round).NextBytes(data);
        return new Entry(page, (byte)PageEncoding.Raw, data);
    }

    /// <summary>Control connection: reads a script, collects replies, and signals each frame written (one Write per frame).</summary>
    private sealed class ControlScript(byte[] input) : Stream
    {
        private readonly MemoryStream _in = new(input, writable: false);
        private readonly MemoryStream _out = new();
        public readonly SemaphoreSlim FramesWritten = new(0);

        public byte[] Written { get { lock (_out) return _out.ToArray(); } }
        public override int Read(byte[] buffer, int offset, int count) => _in.Read(buffer, offset, count);
        public override int Read(Span<byte> buffer) => _in.Read(buffer);
        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
        public override void Write(ReadOnlySpan<byte> buffer) { lock (_out) _out.Write(buffer); FramesWritten.Release(); }
        public override void Flush() { }
        public override bool CanRead => true;
        public override bool CanWrite => true;
        public override bool CanSeek => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }

    /// <summary>
    /// A data connection from a script: past <paramref name="gateAt"/> bytes it reads nothing
    /// until <paramref name="gate"/> opens; at the end of the script it blocks (a source keeps
    /// its data connections open) until disposed, as the destination does when it is done.
    /// </summary>
    private sealed class DataScript(byte[] input, long gateAt = long.MaxValue, ManualResetEventSlim? gate = null) : Stream
    {
        private readonly MemoryStream _in = new(input, writable: false);
        private readonly ManualResetEventSlim _closed = new();

        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
        public override int Read(Span<byte> buffer)
        {
            if (_in.Position >= gateAt && gate is not null && !gate.Wait(Guard)) throw new IOException("test gate never opened");
            long limit = _in.Position < gateAt ? gateAt - _in.Position : long.MaxValue;
            int n = _in.Read(buffer[..(int)Math.Min(buffer.Length, limit)]);
            if (n > 0) return n;
            if (!_closed.Wait(Guard)) throw new IOException("test: nobody closed the data connection");
            throw new ObjectDisposedException(nameof(DataScript));
        }
        public override void Write(byte[] buffer, int offset, int count) { }
        public override void Write(ReadOnlySpan<byte> buffer) { }
        public override void Flush() { }
        protected override void Dispose(bool disposing) { _closed.Set(); base.Dispose(disposing); }
        public override bool CanRead => true;
        public override bool CanWrite => true;
        public override bool CanSeek => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }

    private static void StreamFrame<T>(Script s, FrameType type, T message, Func<T, byte[], int> write)
    {
        var b = new byte[64];
        s.Frame(type, b.AsSpan(0, write(message, b)));
    }

    private static void Attach(Script s, Guid id, int index, int count) => StreamFrame(s, FrameType.StreamAttach, new StreamAttachMessage(id, index, count), (m, b) => m.Write(b));
    private static void StreamEnd(Script s, int round, long pages) => StreamFrame(s, FrameType.StreamRoundEnd, new StreamRoundEndMessage(round, pages), (m, b) => m.Write(b));
    private static void StreamsFrame(Script s, int count) => StreamFrame(s, FrameType.Streams, new StreamsMessage(count), (m, b) => m.Write(b));
    private static void Sync(Script s, int round) => StreamFrame(s, FrameType.Sync, new SyncMessage(round), (m, b) => m.Write(b));

    /// <summary>
    /// The race, made deterministic: stream B is held before it sends a byte of round 0 until
    /// stream A has placed all of round 1 (A runs a round ahead: nothing orders streams against
    /// each other). Pages 0–63 and 128–191 travel on A, 64–127 and 192–255 on B; each page is
    /// written in several rounds, and the destination must end with the last version of each,
    /// acknowledge a round only when both streams delivered it, and resume with the hash of
    /// exactly those versions.
    /// </summary>
    [Fact]
    public async Task Streams_race_a_round_ahead_of_each_other_and_every_page_ends_at_its_last_version()
    {
        string name = NewName();
        var hello = StreamHello(name);
        // stream → round → pages
        var plan = new Dictionary<int, uint[][]>
        {
            [0] = [[0, 1, 128], [0, 128, 129], [1]],
            [1] = [[64, 65, 200], [64], [200, 255]],
        };
        const int Final = 2;
        var expected = new PageHashes(256);
        var last = new Dictionary<uint, int>();
        foreach (var (_, rounds) in plan)
            for (int r = 0; r < rounds.Length; r++)
                foreach (uint p in rounds[r]) last[p] = r;
        foreach (var (p, r) in last) expected.Set(p, Version(p, r).Data);

        byte[] vmState;
        using (var donor = BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = 1 << 20, Workload = "idle", Seed = 1 }))
            vmState = donor.SaveState();
        using var control = new Script();
        control.Hello(hello);
        StreamsFrame(control, 2);
        for (int r = 0; r <= Final; r++)
        {
            control.RoundStart(r, final: r == Final);
            if (r < Final) Sync(control, r);
            control.RoundEnd(r);
        }
        control.VmState(vmState);
        var b = new byte[64];
        control.Frame(FrameType.Prepare, b.AsSpan(0, new PrepareMessage(true, expected.Combine(), last.Count).Write(b)));
        control.Frame(FrameType.Commit, []);

        var data = new byte[2][];
        long gateAt = 0;
        for (int i = 0; i < 2; i++)
        {
            using var s = new Script();
            Attach(s, hello.MigrationId, i, 2);
            if (i == 1) gateAt = s.Offset;
            for (int r = 0; r < plan[i].Length; r++)
            {
                s.Pages(r, [.. plan[i][r].Select(p => Version(p, r))]);
                StreamEnd(s, r, plan[i][r].Length);
            }
            data[i] = s.Bytes();
        }

        using var gate = new ManualResetEventSlim();
        var events = new ConcurrentQueue<(int Stream, int Round)>();
        var compare = new List<string>();
        var options = new DestinationOptions
        {
            StreamRoundPlaced = (stream, round) => { events.Enqueue((stream, round)); if (stream == 0 && round == 1) gate.Set(); },
            BeforeResume = vm =>
            {
                foreach (var (p, r) in last) if (!vm.Memory.Page(p).SequenceEqual(Version(p, r).Data)) compare.Add($"page {p} is not at its round-{r} version");
            },
            VerifyFromScratch = true,
        };
        var sessions = new DestinationSessions(); // the control and data connections of one destination
        var controlStream = new ControlScript(control.Bytes());
        var incoming = Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(controlStream), TaskCreationOptions.LongRunning);
        // The data connections attach once the session exists (a source waits for StreamsAck too).
        Assert.True(controlStream.FramesWritten.Wait(Guard) && controlStream.FramesWritten.Wait(Guard), "no HelloAck and StreamsAck");
        var streams = new[] { new DataScript(data[0]), new DataScript(data[1], gateAt, gate) };
        var served = streams.Select(s => Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(s), TaskCreationOptions.LongRunning)).ToArray();

        var arrived = await incoming.WaitAsync(Guard);
        Assert.NotNull(arrived);
        using var vm = arrived.Vm;
        foreach (var t in served) Assert.Null(await t.WaitAsync(Guard));

        var order = events.ToList();
        output.WriteLine(string.Join(" ", order.Select(e => $"{e.Stream}:{e.Round}")));
        // Stream A placed round 1 before stream B had sent anything of round 0.
        Assert.True(order.IndexOf((0, 1)) < order.IndexOf((1, 0)));
        Assert.Empty(compare);
        Assert.True(arrived.Report.Verified);
        Assert.Equal($"{expected.Combine():x16}", arrived.Report.DestinationHash);
        Assert.Equal(2, arrived.Report.Streams);
        Assert.Equal(plan.Values.Sum(rs => rs.Sum(r => r.Length)), arrived.Report.PagesSent);
        // Sync(0) was acknowledged only after both streams ended round 0: SyncAck is the third reply.
        using var replies = new FrameReader(new MemoryStream(controlStream.Written));
        Assert.Equal(FrameType.HelloAck, replies.Read(out _));
        Assert.Equal(FrameType.StreamsAck, replies.Read(out _));
        Assert.Equal(FrameType.SyncAck, replies.Read(out _));
    }

    [Fact]
    public void Fault_a_stream_count_above_the_limit_is_refused()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(StreamHello(name));
        StreamsFrame(s, StreamLayout.MaxStreams + 1);
        var (e, replies) = ReceiveFails(s.Bytes(), name);
        Assert.Contains($"refused: {StreamLayout.MaxStreams + 1} data streams requested; this destination accepts 2..{StreamLayout.MaxStreams}", e.Message);
        Assert.Equal(ErrorMessage.Refused, replies[^1].Error!.Value.Code);
    }

    [Fact]
    public void Fault_streams_without_the_capability_is_a_protocol_error()
    {
        string name = NewName();
        using var s = new Script();
        s.Hello(Hello(name));
        StreamsFrame(s, 2);
        var (e, _) = ReceiveFails(s.Bytes(), name);
        Assert.Contains("Streams (frame 1) without the MultiStream capability", e.Message);
    }

    [Fact]
    public void Fault_a_stream_attaching_to_an_unknown_migration_is_refused()
    {
        using var s = new Script();
        var id = Guid.NewGuid();
        Attach(s, id, 0, 2);
        var (e, replies) = ReceiveFails(s.Bytes(), vmName: null);
        Assert.Equal($"StreamAttach: no multi-stream migration {id} is in progress here", e.Message);
        Assert.Equal(ErrorMessage.BadStream, replies[^1].Error!.Value.Code);
    }

    [Fact]
    public async Task Fault_a_data_stream_sending_another_rounds_pages_fails_the_whole_migration()
    {
        string name = NewName();
        var hello = StreamHello(name);
        using var control = new Script();
        control.Hello(hello);
        StreamsFrame(control, 2);
        control.RoundStart(0);
        Sync(control, 0);
        using var bad = new Script();
        Attach(bad, hello.MigrationId, 1, 2);
        bad.Pages(3, Version(64, 0));
        var controlStream = new ControlScript(control.Bytes());
        var options = new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(5) };
        var sessions = new DestinationSessions(); // the control and data connections of one destination
        var incoming = Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(controlStream), TaskCreationOptions.LongRunning);
        Assert.True(controlStream.FramesWritten.Wait(Guard) && controlStream.FramesWritten.Wait(Guard));
        var stream1 = Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(new DataScript(bad.Bytes())), TaskCreationOptions.LongRunning);
        var e = await Assert.ThrowsAsync<MigrationFailedException>(() => incoming.WaitAsync(Guard));
        output.WriteLine(e.Message);
        Assert.Equal("data stream 1: PageBatch (frame 1) of round 3 while this stream's round 0 is open", e.Message);
        Assert.Null(await stream1.WaitAsync(Guard));
        AssertNoIncomingMemory(name);
    }

    [Fact]
    public async Task Fault_a_data_stream_that_never_attaches_times_out_instead_of_hanging()
    {
        string name = NewName();
        var hello = StreamHello(name);
        using var control = new Script();
        control.Hello(hello);
        StreamsFrame(control, 2);
        control.RoundStart(0);
        Sync(control, 0);
        using var one = new Script();
        Attach(one, hello.MigrationId, 0, 2);
        one.Pages(0, Version(0, 0));
        StreamEnd(one, 0, 1);
        var controlStream = new ControlScript(control.Bytes());
        var options = new DestinationOptions { IoTimeout = TimeSpan.FromSeconds(1) };
        var sessions = new DestinationSessions(); // the control and data connections of one destination
        var incoming = Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(controlStream), TaskCreationOptions.LongRunning);
        Assert.True(controlStream.FramesWritten.Wait(Guard) && controlStream.FramesWritten.Wait(Guard));
        var stream0 = Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(new DataScript(one.Bytes())), TaskCreationOptions.LongRunning);
        var sw = Stopwatch.StartNew();
        var e = await Assert.ThrowsAsync<MigrationFailedException>(() => incoming.WaitAsync(Guard));
        Assert.Equal("timed out after 1 s: data stream 1 never attached", e.Message);
        Assert.InRange(sw.Elapsed, TimeSpan.FromMilliseconds(500), TimeSpan.FromSeconds(8));
        Assert.Null(await stream0.WaitAsync(Guard)); // closed by the failing migration
        AssertNoIncomingMemory(name);
    }

    /// <summary>
    /// Mutation fuzzing of one data connection of a two-stream migration (the control
    /// connection and the other stream stay valid): bit flips with and without a re-sealed
    /// checksum, a changed round or page count, dropped, duplicated and swapped frames,
    /// truncation. Every input must end in a verified arrival or a clean failure that stops every
    /// stream thread and discards the memory: never a hang, another exception or a VM built from
    /// wrong pages. Seeded.
    /// </summary>
    [Fact]
    [Trait("Category", "Heavy")]
    public async Task Fuzz_a_mutated_data_stream_fails_cleanly_or_arrives_verified()
    {
        var rng = new Random(20261126);
        int completed = 0, failed = 0;
        var outcomes = new Dictionary<string, int>();
        for (int input = 0; input < 60; input++)
        {
            string name = NewName();
            var hello = StreamHello(name);
            uint[][][] plan = [[[0, 1, 128], [1, 129]], [[64, 65, 200], [64]]];
            var expected = new PageHashes(256);
            for (int i = 0; i < 2; i++) for (int r = 0; r < 2; r++) foreach (uint p in plan[i][r]) expected.Set(p, Version(p, r).Data);
            byte[] vmState;
            using (var donor = BuiltInVm.Create(new VmConfig { Name = name, MemoryBytes = 1 << 20, Workload = "idle", Seed = 1 }))
                vmState = donor.SaveState();
            using var control = new Script();
            control.Hello(hello);
            StreamsFrame(control, 2);
            control.RoundStart(0);
            Sync(control, 0);
            control.RoundEnd(0);
            control.RoundStart(1, final: true);
            control.RoundEnd(1);
            control.VmState(vmState);
            var b = new byte[64];
            control.Frame(FrameType.Prepare, b.AsSpan(0, new PrepareMessage(true, expected.Combine(), 0).Write(b)));
            control.Frame(FrameType.Commit, []);
            var data = new byte[2][];
            for (int i = 0; i < 2; i++)
            {
                using var sc = new Script();
                Attach(sc, hello.MigrationId, i, 2);
                for (int r = 0; r < 2; r++)
                {
                    sc.Pages(r, [.. plan[i][r].Select(p => Version(p, r))]);
                    StreamEnd(sc, r, plan[i][r].Length);
                }
                data[i] = sc.Bytes();
            }
            int victim = rng.Next(2);
            data[victim] = MutateDataStream(data[victim], rng, out string how);

            var controlStream = new ControlScript(control.Bytes());
            var options = new DestinationOptions { IoTimeout = TimeSpan.FromMilliseconds(500) };
            var sessions = new DestinationSessions(); // the control and data connections of one destination
            var incoming = Task.Factory.StartNew(() => new IncomingMigration(options, sessions).Receive(controlStream), TaskCreationOptions.LongRunning);
            Assert.True(controlStream.FramesWritten.Wait(Guard) && controlStream.FramesWritten.Wait(Guard));
            var served = data.Select(d => Task.Factory.StartNew(() =>
            {
                try { return new IncomingMigration(options, sessions).Receive(new DataScript(d)) is null ? "" : "a VM from a data connection"; }
                catch (MigrationFailedException) { return ""; } // refused at attach (e.g. a mutated id): the control connection then times out
            }, TaskCreationOptions.LongRunning)).ToArray();
            string outcome;
            try
            {
                var arrived = await incoming.WaitAsync(Guard);
                Assert.NotNull(arrived);
                using var vm = arrived.Vm;
                Assert.Equal($"{expected.Combine():x16}", arrived.Report.DestinationHash);
                outcome = "completed";
                completed++;
            }
            catch (MigrationFailedException e)
            {
                Assert.DoesNotContain("\n", e.Message);
                outcome = Category(e.Message);
                failed++;
                AssertNoIncomingMemory(name);
            }
            catch (TimeoutException) { Assert.Fail($"input {input} ({how}): the destination hung"); throw; }
            foreach (var t in served) Assert.Equal("", await t.WaitAsync(Guard));
            outcomes[outcome] = outcomes.GetValueOrDefault(outcome) + 1;
            output.WriteLine($"{input}: stream {victim} {how} -> {outcome}");
        }
        output.WriteLine($"{completed} completed, {failed} failed: " + string.Join(", ", outcomes.Select(kv => $"{kv.Key} {kv.Value}")));
        Assert.True(failed > 30, "the mutations did not reach the checks");
    }

    private static string Category(string message)
    {
        foreach (var key in new[] { "checksum", "bad magic", "unknown frame type", "exceeds the limit", "reserved", "closed the connection", "unexpected", "outside guest memory",
                     "encoding", "round", "pages", "timed out", "truncated", "trailing", "verification", "attach" })
            if (message.Contains(key, StringComparison.OrdinalIgnoreCase)) return key;
        return "other";
    }

    /// <summary>One structure-aware mutation of a data connection's bytes (its first frame, StreamAttach, is left alone half the time).</summary>
    private static byte[] MutateDataStream(byte[] input, Random rng, out string how)
    {
        var frames = new List<byte[]>();
        for (int at = 0; at < input.Length;)
        {
            int len = FrameFormat.HeaderSize + (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32LittleEndian(input.AsSpan(at + 8));
            frames.Add(input.AsSpan(at, len).ToArray());
            at += len;
        }
        int first = rng.Next(2) == 0 ? 1 : 0;
        int k = rng.Next(first, frames.Count);
        byte[] f = frames[k];
        void Reseal(byte[] fr) => System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(fr.AsSpan(12), FrameFormat.Checksum(fr.AsSpan(0, 8), fr.AsSpan(FrameFormat.HeaderSize)));
        switch (rng.Next(7))
        {
            case 0:
                int bit = rng.Next(f.Length * 8);
                f[bit / 8] ^= (byte)(1 << (bit % 8));
                how = $"bit {bit} of frame {k} flipped";
                break;
            case 1:
                if (f.Length > FrameFormat.HeaderSize)
                {
                    int at = FrameFormat.HeaderSize + rng.Next(Math.Min(64, f.Length - FrameFormat.HeaderSize));
                    f[at] ^= (byte)(1 << rng.Next(8));
                    Reseal(f);
                }
                how = $"frame {k}: a header field of its payload changed, checksum re-sealed";
                break;
            case 2:
                if (f.Length >= FrameFormat.HeaderSize + 4)
                {
                    System.Buffers.Binary.BinaryPrimitives.WriteUInt32LittleEndian(f.AsSpan(FrameFormat.HeaderSize), (uint)rng.Next(4));
                    Reseal(f);
                }
                how = $"frame {k}: round changed, re-sealed";
                break;
            case 3:
                frames.RemoveAt(k);
                how = $"frame {k} dropped";
                break;
            case 4:
                frames.Insert(k, (byte[])f.Clone());
                how = $"frame {k} duplicated";
                break;
            case 5:
                int j = rng.Next(first, frames.Count);
                (frames[k], frames[j]) = (frames[j], frames[k]);
                how = $"frames {k} and {j} swapped";
                break;
            default:
                var all = frames.SelectMany(x => x).ToArray();
                int cut = rng.Next(all.Length);
                how = $"truncated at byte {cut}";
                return all[..cut];
        }
        return [.. frames.SelectMany(x => x)];
    }

    [Theory]
    [InlineData(new byte[] { 1, 2, 3 }, "StreamAttach: truncated at migrationId (byte 0, need 16, have 3)")]
    [InlineData(null, "StreamAttach: stream index 4 is out of range 0..3", 4, 4)]
    [InlineData(null, "StreamAttach: 17 streams is out of range 1..16", 0, 17)]
    [InlineData(null, "StreamAttach: 0 streams is out of range 1..16", 0, 0)]
    public void StreamAttach_parsing_rejects_bad_input_in_one_line(byte[]? raw, string error, int index = 0, int count = 0)
    {
        byte[] payload = raw ?? new byte[20];
        if (raw is null) new StreamAttachMessage(Guid.NewGuid(), index, count).Write(payload);
        var e = Assert.Throws<ProtocolException>(() => StreamAttachMessage.Parse(payload));
        Assert.Equal(error, e.Message);
    }

    [Fact]
    public void Stream_frames_parse_what_they_write_and_reject_bad_lengths()
    {
        var b = new byte[64];
        var id = Guid.NewGuid();
        int n = new StreamAttachMessage(id, 3, 8).Write(b);
        Assert.Equal(new StreamAttachMessage(id, 3, 8), StreamAttachMessage.Parse(b.AsSpan(0, n)));
        Assert.Equal("StreamAttach: 1 unexpected trailing bytes", Assert.Throws<ProtocolException>(() => StreamAttachMessage.Parse(b.AsSpan(0, n + 1))).Message);
        n = new StreamRoundEndMessage(7, 12345).Write(b);
        Assert.Equal(new StreamRoundEndMessage(7, 12345), StreamRoundEndMessage.Parse(b.AsSpan(0, n)));
        Assert.StartsWith("StreamRoundEnd: truncated at pages", Assert.Throws<ProtocolException>(() => StreamRoundEndMessage.Parse(b.AsSpan(0, n - 1))).Message);
        n = new StreamRoundEndMessage(7, -1).Write(b);
        Assert.Equal("StreamRoundEnd: negative page count -1", Assert.Throws<ProtocolException>(() => StreamRoundEndMessage.Parse(b.AsSpan(0, n))).Message);
        n = new StreamsMessage(4).Write(b);
        Assert.Equal(4, StreamsMessage.Parse(b.AsSpan(0, n), "Streams").Count);
        Assert.StartsWith("Streams: truncated at count", Assert.Throws<ProtocolException>(() => StreamsMessage.Parse(b.AsSpan(0, 1), "Streams")).Message);
        Assert.StartsWith("StreamAttached: truncated", Assert.Throws<ProtocolException>(() => StreamAttachedMessage.Parse(b.AsSpan(0, 0))).Message);
        // A page's stream is fixed by its 64-page chunk.
        Assert.Equal(0, StreamLayout.StreamOf(63, 3));
        Assert.Equal(1, StreamLayout.StreamOf(64, 3));
        Assert.Equal(0, StreamLayout.StreamOf(3 * 64, 3));
    }
}
