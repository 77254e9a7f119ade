using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Protocol;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// Structure-aware mutation fuzzing of the destination (frame decoder, message parsers, state
/// machine, page decoding): real source streams from the committed corpus are cut into frames
/// and mutated — bit flips with and without re-sealed checksums, boundary values in payload
/// fields, wrong types and lengths, dropped, duplicated and swapped frames, truncation — and
/// replayed into <see cref="IncomingMigration"/>. Property: every input ends in a completed
/// migration or a <see cref="MigrationFailedException"/>; never another exception, a hang, or
/// more than <see cref="AllocationLimit"/> bytes allocated. Seeded; the time budget comes from
/// LIVEMIG_FUZZ_SECONDS (default 20); the number of inputs tried is printed.
/// </summary>
[Trait("Category", "Heavy")]
public class FuzzTests(ITestOutputHelper output)
{
    private const long AllocationLimit = 96L << 20;
    private static readonly string CorpusDir = Path.Combine(AppContext.BaseDirectory, "fuzz-corpus");

    [Fact]
    public async Task Destination_survives_mutated_streams()
    {
        var corpus = LoadCorpus();
        Assert.NotEmpty(corpus);
        double seconds = double.TryParse(Environment.GetEnvironmentVariable("LIVEMIG_FUZZ_SECONDS"), out var s) ? s : 20;
        var rng = new Random(20261125);
        // A Hello may ask for pre-copy resume: the destination then waits its resume window after
        // the input ends. Short here, so the 10 s hang guard measures the code, not the window.
        var options = new DestinationOptions { MaxMemoryBytes = 64L << 20, IoTimeout = TimeSpan.FromSeconds(2), ResumeWindow = TimeSpan.FromMilliseconds(300), DirtyLog = LiveMig.DirtyTracking.DirtyLogKind.Software };
        var sw = Stopwatch.StartNew();
        long tried = 0, completed = 0;
        var outcomes = new Dictionary<string, int>();
        while (sw.Elapsed.TotalSeconds < seconds)
        {
            var frames = corpus[rng.Next(corpus.Count)];
            byte[] input = Mutate(frames, rng, out string how);
            tried++;
            long before = GC.GetAllocatedBytesForCurrentThread();
            var run = Task.Factory.StartNew(() =>
            {
                long t0 = GC.GetAllocatedBytesForCurrentThread();
                try
                {
                    var arrived = new IncomingMigration(options).Receive(new ReplayStream(input));
                    if (arrived is null) return ("attach", GC.GetAllocatedBytesForCurrentThread() - t0, (Exception?)null); // a post-copy re-attach served, no VM
                    arrived.Vm.Dispose();
                    return ("completed", GC.GetAllocatedBytesForCurrentThread() - t0, (Exception?)null);
                }
                catch (MigrationFailedException e) { return (Category(e.Message), GC.GetAllocatedBytesForCurrentThread() - t0, (Exception?)null); }
                catch (Exception e) { return ("crash", 0L, e); }
            }, TaskCreationOptions.LongRunning);
            if (await Task.WhenAny(run, Task.Delay(TimeSpan.FromSeconds(10))) != run)
                Assert.Fail($"hang on input {tried} ({how}); saved to {Save(input)}");
            var (outcome, allocated, crash) = await run;
            if (crash is not null) Assert.Fail($"input {tried} ({how}) raised {crash.GetType().Name}: {crash.Message}; saved to {Save(input)}\n{crash}");
            Assert.True(allocated < AllocationLimit, $"input {tried} ({how}) allocated {allocated:N0} bytes; saved to {Save(input)}");
            if (outcome == "completed") completed++;
            outcomes[outcome] = outcomes.GetValueOrDefault(outcome) + 1;
            _ = before;
        }
        string summary = $"fuzz: {tried} inputs in {sw.Elapsed.TotalSeconds:0} s, {completed} completed, outcomes: " +
                         string.Join(", ", outcomes.OrderByDescending(kv => kv.Value).Take(12).Select(kv => $"{kv.Key} {kv.Value}"));
        output.WriteLine(summary);
        Console.WriteLine(summary);
        File.WriteAllText(Path.Combine(AppContext.BaseDirectory, "fuzz-summary.txt"), summary + "\n");
        Assert.True(tried > 100, summary);
    }

    /// <summary>A short class of the failure, so the summary shows which checks the inputs reached.</summary>
    private static string Category(string message)
    {
        foreach (var key in new[] { "checksum", "bad magic", "unknown frame type", "exceeds the limit", "reserved", "closed the connection", "unexpected", "outside guest memory",
                     "encoding", "version", "refused", "VM state", "truncated", "trailing", "round", "verification", "timed out", "Hello" })
            if (message.Contains(key, StringComparison.OrdinalIgnoreCase)) return key;
        return "other";
    }

    private static string Save(byte[] input)
    {
        string path = Path.Combine(Path.GetTempPath(), $"livemig-fuzz-{Guid.NewGuid():N}.bin");
        File.WriteAllBytes(path, input);
        return path;
    }

    // ---- corpus -----------------------------------------------------------------------------

    private static List<List<byte[]>> LoadCorpus()
    {
        var list = new List<List<byte[]>>();
        if (Directory.Exists(CorpusDir))
            foreach (var f in Directory.GetFiles(CorpusDir, "*.bin").Order())
                list.Add(SplitFrames(File.ReadAllBytes(f)));
        return list;
    }

    /// <summary>Cuts a recorded stream into whole frames (header + payload).</summary>
    internal static List<byte[]> SplitFrames(byte[] stream)
    {
        var frames = new List<byte[]>();
        int at = 0;
        while (at + FrameFormat.HeaderSize <= stream.Length)
        {
            int len = (int)BinaryPrimitives.ReadUInt32LittleEndian(stream.AsSpan(at + 8));
            if (at + FrameFormat.HeaderSize + len > stream.Length) break;
            frames.Add(stream.AsSpan(at, FrameFormat.HeaderSize + len).ToArray());
            at += FrameFormat.HeaderSize + len;
        }
        return frames;
    }

    /// <summary>
    /// Regenerates the committed corpus: real source streams of small VMs. Run by hand
    /// (LIVEMIG_WRITE_CORPUS=dir) when the protocol changes; the test itself only reads.
    /// </summary>
    [Fact]
    public void Corpus_is_a_real_and_current_source_stream()
    {
        string? writeTo = Environment.GetEnvironmentVariable("LIVEMIG_WRITE_CORPUS");
        var seeds = new[] { ("idle-mixed", "idle", MemoryFill.Mixed), ("sweep", "sweep:rate=50000", MemoryFill.Zero), ("random", "random:rate=20000", MemoryFill.Random) };
        foreach (var (name, workload, fill) in seeds)
        {
            if (writeTo is not null) File.WriteAllBytes(Path.Combine(writeTo, name + ".bin"), Record(workload, fill));
            // The committed file must still parse as frames that this build's destination accepts.
            string committed = Path.Combine(writeTo ?? CorpusDir, name + ".bin");
            Assert.True(File.Exists(committed), $"corpus file {committed} missing (regenerate with LIVEMIG_WRITE_CORPUS)");
            var options = new DestinationOptions { DirtyLog = LiveMig.DirtyTracking.DirtyLogKind.Software };
            var arrived = new IncomingMigration(options).Receive(new ReplayStream(File.ReadAllBytes(committed)));
            Assert.NotNull(arrived);
            Assert.True(arrived.Report.Verified);
            arrived.Vm.Dispose();
        }
    }

    private static byte[] Record(string workload, MemoryFill fill)
    {
        using var loop = new Loopback(new DestinationOptions { DirtyLog = LiveMig.DirtyTracking.DirtyLogKind.Software });
        using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = 256 << 10, Vcpus = 1, Workload = workload, Fill = fill, Seed = 7, DirtyLog = LiveMig.DirtyTracking.DirtyLogKind.Software });
        vm.Start();
        using var client = new TcpClient("127.0.0.1", loop.Port);
        using var rec = new RecordingStream(client.GetStream());
        new PreCopyMigration(vm, new MigrationOptions()).Run(rec);
        return rec.Written.ToArray();
    }

    // ---- mutation -----------------------------------------------------------------------------

    private static byte[] Mutate(List<byte[]> original, Random rng, out string how)
    {
        var frames = original.Select(f => (byte[])f.Clone()).ToList();
        int ops = 1 + rng.Next(3);
        var done = new List<string>();
        for (int k = 0; k < ops; k++)
        {
            int i = rng.Next(frames.Count);
            byte[] f = frames[i];
            if (f.Length < FrameFormat.HeaderSize) { done.Add($"keep short f{i}"); continue; } // an earlier cut: leave it
            switch (rng.Next(9))
            {
                case 0: // flip bits in the payload and re-seal: reaches the message parsers and handlers
                    if (f.Length > FrameFormat.HeaderSize) { for (int n = rng.Next(1, 4); n > 0; n--) f[FrameFormat.HeaderSize + rng.Next(f.Length - FrameFormat.HeaderSize)] ^= (byte)(1 << rng.Next(8)); Seal(f); }
                    done.Add($"flip+seal f{i}"); break;
                case 1: // flip anywhere, no re-seal
                    f[rng.Next(f.Length)] ^= (byte)(1 << rng.Next(8)); done.Add($"flip f{i}"); break;
                case 2: // boundary value into an aligned payload field
                    if (f.Length >= FrameFormat.HeaderSize + 4)
                    {
                        int at = FrameFormat.HeaderSize + rng.Next((f.Length - FrameFormat.HeaderSize) / 4) * 4;
                        uint[] values = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 65, 64, 4097];
                        BinaryPrimitives.WriteUInt32LittleEndian(f.AsSpan(at), values[rng.Next(values.Length)]);
                        Seal(f);
                    }
                    done.Add($"boundary f{i}"); break;
                case 3: // another frame type, re-sealed
                    f[4] = (byte)rng.Next(0, 16); Seal(f); done.Add($"type f{i}={f[4]}"); break;
                case 4: // a lying length field
                    BinaryPrimitives.WriteUInt32LittleEndian(f.AsSpan(8), (uint)rng.Next()); done.Add($"length f{i}"); break;
                case 5: frames.RemoveAt(i); done.Add($"drop f{i}"); if (frames.Count == 0) frames.Add(new byte[1]); break;
                case 6: frames.Insert(i, (byte[])f.Clone()); done.Add($"dup f{i}"); break;
                case 7: { int j = rng.Next(frames.Count); (frames[i], frames[j]) = (frames[j], frames[i]); done.Add($"swap f{i} f{j}"); break; }
                default: // truncate the frame
                    frames[i] = f.AsSpan(0, rng.Next(f.Length)).ToArray(); done.Add($"cut f{i}"); break;
            }
        }
        how = string.Join(", ", done);
        return frames.SelectMany(x => x).ToArray();
    }

    /// <summary>Recomputes a frame's checksum after its bytes were changed.</summary>
    private static void Seal(byte[] frame)
    {
        if (frame.Length < FrameFormat.HeaderSize) return;
        int len = Math.Min((int)BinaryPrimitives.ReadUInt32LittleEndian(frame.AsSpan(8)), frame.Length - FrameFormat.HeaderSize);
        BinaryPrimitives.WriteUInt32LittleEndian(frame.AsSpan(12), FrameFormat.Checksum(frame.AsSpan(0, 8), frame.AsSpan(FrameFormat.HeaderSize, len)));
    }

    /// <summary>Reads come from the input; what the destination writes back goes nowhere.</summary>
    private sealed class ReplayStream(byte[] input) : Stream
    {
        private int _at;
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => input.Length;
        public override long Position { get => _at; set => throw new NotSupportedException(); }
        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
        public override int Read(Span<byte> buffer)
        {
            int n = Math.Min(buffer.Length, input.Length - _at);
            input.AsSpan(_at, n).CopyTo(buffer);
            _at += n;
            return n;
        }
        public override void Write(byte[] buffer, int offset, int count) { }
        public override void Write(ReadOnlySpan<byte> buffer) { }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }

    private sealed class RecordingStream(Stream inner) : LiveMig.Transport.DelegatingStream(inner)
    {
        public MemoryStream Written { get; } = new();
        public override void Write(ReadOnlySpan<byte> buffer) { Written.Write(buffer); Inner.Write(buffer); }
    }
}
