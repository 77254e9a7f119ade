using System.Buffers.Binary;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Transport;

namespace LiveMig.Tests;

/// <summary>Page contents the codec tests use.</summary>
internal static class Pages
{
    public const int Size = GuestMemory.PageSize;

    public static byte[] Zero() => new byte[Size];

    public static byte[] Random(int seed)
    {
        var p = new byte[Size];
        new Random(seed).NextBytes(p);
        return p;
    }

    private static readonly byte[] Vocabulary = "the of and to in is for that with on as by this from at memory page guest vcpu kernel migration dirty round copy send "u8.ToArray();

    /// <summary>Words from a small vocabulary, like MemoryFill's text pages.</summary>
    public static byte[] Text(int seed)
    {
        var rng = new Random(seed);
        var p = new byte[Size];
        int i = 0;
        while (i < Size)
        {
            int start = rng.Next(Vocabulary.Length - 12), len = 4 + rng.Next(8);
            for (int k = 0; k < len && i < Size; k++) p[i++] = Vocabulary[start + k];
        }
        return p;
    }

    /// <summary>A few distinct byte values in long runs (a page of counters, a bitmap): highly redundant.</summary>
    public static byte[] Runs(int seed)
    {
        var rng = new Random(seed);
        var p = new byte[Size];
        for (int i = 0; i < Size;)
        {
            int len = 16 + rng.Next(200);
            byte v = (byte)rng.Next(4);
            for (int k = 0; k < len && i < Size; k++) p[i++] = v;
        }
        return p;
    }

    /// <summary>A copy of <paramref name="page"/> with <paramref name="writes"/> random 8-byte writes (what the random workload does).</summary>
    public static byte[] Sparse(byte[] page, int writes, int seed)
    {
        var rng = new Random(seed);
        var p = (byte[])page.Clone();
        for (int i = 0; i < writes; i++) BinaryPrimitives.WriteInt64LittleEndian(p.AsSpan(rng.Next(Size / 8) * 8), rng.NextInt64());
        return p;
    }

    public static IEnumerable<object[]> Kinds() => new[] { "zero", "random", "text", "runs" }.Select(k => new object[] { k });

    public static byte[] Of(string kind, int seed = 1) => kind switch
    {
        "zero" => Zero(), "random" => Random(seed), "text" => Text(seed), "runs" => Runs(seed),
        _ => throw new ArgumentException(kind),
    };
}

public class CodecTests
{
    private const int Size = GuestMemory.PageSize;

    // ---- LZ4 and Zstd --------------------------------------------------------------------

    [Theory]
    [MemberData(nameof(Pages.Kinds), MemberType = typeof(Pages))]
    public void Codec_lz4_round_trips_every_level_or_declines_incompressible_pages(string kind)
    {
        byte[] page = Pages.Of(kind);
        foreach (int level in new[] { 0, 3, 9, 12 })
        {
            var buf = new byte[PipelineEncoder.Budget];
            int n = Lz4Page.Encode(page, buf, Lz4Page.Level(level));
            if (kind == "random") { Assert.Equal(-1, n); continue; }
            Assert.InRange(n, 1, PipelineEncoder.Budget);
            var back = new byte[Size];
            Lz4Page.Decode(7, buf.AsSpan(0, n), back);
            Assert.Equal(page, back);
        }
    }

    [Theory]
    [MemberData(nameof(Pages.Kinds), MemberType = typeof(Pages))]
    public void Codec_zstd_round_trips_every_level_or_declines_incompressible_pages(string kind)
    {
        byte[] page = Pages.Of(kind);
        using var d = new ZstdPageDecompressor();
        foreach (int level in new[] { -5, 1, 3, 19 })
        {
            using var z = new ZstdPageCompressor(level);
            var buf = new byte[PipelineEncoder.Budget];
            int n = z.Encode(page, buf);
            if (kind == "random") { Assert.Equal(-1, n); continue; }
            Assert.InRange(n, 1, PipelineEncoder.Budget);
            var back = new byte[Size];
            d.Decode(7, buf.AsSpan(0, n), back);
            Assert.Equal(page, back);
        }
    }

    [Fact]
    public void Codec_zstd_compresses_text_better_than_lz4()
    {
        byte[] page = Pages.Text(3);
        var buf = new byte[Size];
        int lz4 = Lz4Page.Encode(page, buf, Lz4Page.Level(0));
        using var z = new ZstdPageCompressor(3);
        int zstd = z.Encode(page, buf);
        Assert.True(zstd < lz4, $"zstd {zstd}, lz4 {lz4}");
    }

    [Fact]
    public void Codec_corrupt_lz4_and_zstd_payloads_are_protocol_errors_never_crashes()
    {
        byte[] page = Pages.Text(5);
        var lz4 = new byte[Size];
        int nl = Lz4Page.Encode(page, lz4, Lz4Page.Level(0));
        using var zc = new ZstdPageCompressor(3);
        var zs = new byte[Size];
        int nz = zc.Encode(page, zs);
        using var zd = new ZstdPageDecompressor();
        var target = new byte[Size];

        var e = Assert.Throws<ProtocolException>(() => Lz4Page.Decode(9, Enumerable.Repeat((byte)0xFF, 100).ToArray(), target));
        Assert.StartsWith("LZ4 page 9: corrupt payload of 100 bytes", e.Message);
        e = Assert.Throws<ProtocolException>(() => zd.Decode(9, Enumerable.Repeat((byte)0xFF, 100).ToArray(), target));
        Assert.StartsWith("Zstd page 9: corrupt payload of 100 bytes", e.Message);
        Assert.Contains("must be 1..4095", Assert.Throws<ProtocolException>(() => Lz4Page.Decode(9, [], target)).Message);
        Assert.Contains("must be 1..4095", Assert.Throws<ProtocolException>(() => zd.Decode(9, new byte[Size], target)).Message);
        // Cut short: decodes to less than a page, or fails.
        Assert.Throws<ProtocolException>(() => Lz4Page.Decode(9, lz4.AsSpan(0, nl / 2), target));
        Assert.Throws<ProtocolException>(() => zd.Decode(9, zs.AsSpan(0, nz / 2), target));

        // Fuzz: flipped bytes either decode to some page or fail as a ProtocolException, nothing else.
        var rng = new Random(11);
        for (int i = 0; i < 300; i++)
        {
            byte[] l = lz4[..nl], z = zs[..nz];
            for (int k = 0; k < 1 + i % 4; k++) { l[rng.Next(l.Length)] ^= (byte)(1 << rng.Next(8)); z[rng.Next(z.Length)] ^= (byte)(1 << rng.Next(8)); }
            try { Lz4Page.Decode(1, l, target); } catch (ProtocolException) { }
            try { zd.Decode(1, z, target); } catch (ProtocolException) { }
        }
    }

    // ---- XBZRLE ------------------------------------------------------------------------------

    [Theory]
    [InlineData("text", 1)]
    [InlineData("text", 20)]
    [InlineData("random", 5)]
    [InlineData("zero", 3)]
    [InlineData("runs", 50)]
    public void Codec_xbzrle_round_trips_sparse_deltas_and_is_small(string kind, int writes)
    {
        byte[] old = Pages.Of(kind), current = Pages.Sparse(old, writes, writes);
        var delta = new byte[PipelineEncoder.Budget];
        int n = XbzrleDelta.Encode(current, old, delta);
        Assert.InRange(n, 1, writes * (8 + 4));
        byte[] target = (byte[])old.Clone();
        XbzrleDelta.Apply(3, delta.AsSpan(0, n), target);
        Assert.Equal(current, target);
    }

    [Fact]
    public void Codec_xbzrle_edges_unchanged_first_and_last_byte_small_gaps_and_overflow()
    {
        byte[] old = Pages.Text(2);
        var delta = new byte[PipelineEncoder.Budget];

        // Unchanged: empty delta.
        Assert.Equal(0, XbzrleDelta.Encode(old, old, delta));
        byte[] same = (byte[])old.Clone();
        XbzrleDelta.Apply(1, [], same);
        Assert.Equal(old, same);

        // First and last byte.
        byte[] cur = (byte[])old.Clone();
        cur[0] ^= 1; cur[^1] ^= 1;
        int n = XbzrleDelta.Encode(cur, old, delta);
        Assert.Equal(1 + 1 + 1 + 2 + 1 + 1, n); // (0,1,b) (4094,1,b): 4094 takes a 2-byte varint
        AssertApplies(old, cur, delta.AsSpan(0, n));

        // Changes separated by gaps shorter than MinGap stay one record.
        cur = (byte[])old.Clone();
        cur[100] ^= 1; cur[102] ^= 1; cur[105] ^= 1;
        n = XbzrleDelta.Encode(cur, old, delta);
        Assert.Equal(1 + 1 + 6, n); // skip 100, length 6 (100..105), 6 bytes
        AssertApplies(old, cur, delta.AsSpan(0, n));

        // Everything changed: does not fit the budget.
        Assert.Equal(-1, XbzrleDelta.Encode(Pages.Random(1), Pages.Random(2), delta));

        // Fuzz: random changes of every density.
        var rng = new Random(4);
        for (int i = 0; i < 300; i++)
        {
            cur = (byte[])old.Clone();
            int changes = rng.Next(1, 400);
            for (int k = 0; k < changes; k++) cur[rng.Next(Size)] = (byte)rng.Next(256);
            var big = new byte[Size * 2];
            n = XbzrleDelta.Encode(cur, old, big);
            Assert.True(n >= 0);
            AssertApplies(old, cur, big.AsSpan(0, n));
        }
    }

    private static void AssertApplies(byte[] old, byte[] current, ReadOnlySpan<byte> delta)
    {
        byte[] target = (byte[])old.Clone();
        XbzrleDelta.Apply(0, delta, target);
        Assert.Equal(current, target);
    }

    [Theory]
    [InlineData(new byte[] { 0 }, "record 0 is cut off before its length")]
    [InlineData(new byte[] { 0x80 }, "record 0 is cut off inside its skip")]
    [InlineData(new byte[] { 0, 0 }, "record 0 has length 0")]
    [InlineData(new byte[] { 0, 5, 1, 2 }, "record 0 needs 5 literal bytes, 2 left")]
    [InlineData(new byte[] { 0xFF, 0x1F, 2, 9, 9 }, "record 0 (skip 4095, length 2 at offset 0) runs past the page end")]
    [InlineData(new byte[] { 0x80, 0x21, 1, 9 }, "record 0 has skip 4224, more than a page")]
    [InlineData(new byte[] { 0x80, 0x80, 0x01, 1, 9 }, "has a skip varint longer than 2 bytes")]
    [InlineData(new byte[] { 0, 1, 7, 0xFF, 0x1F, 1, 9 }, "record 1 (skip 4095, length 1 at offset 1) runs past the page end")]
    public void Codec_corrupt_xbzrle_delta_is_a_protocol_error_and_leaves_the_page_alone(byte[] delta, string expected)
    {
        byte[] page = Pages.Text(1), before = (byte[])page.Clone();
        var e = Assert.Throws<ProtocolException>(() => XbzrleDelta.Apply(42, delta, page));
        Assert.StartsWith("XBZRLE delta for page 42: ", e.Message);
        Assert.Contains(expected, e.Message);
        Assert.Equal(before, page);
    }

    [Fact]
    public void Codec_xbzrle_cache_is_lru_bounded_by_bytes()
    {
        var cache = new XbzrleCache(4 * Size); // one shard of 4 pages
        Assert.Equal(4, cache.CapacityPages);
        var delta = new byte[PipelineEncoder.Budget];
        for (int p = 0; p < 4; p++) cache.Update(p, Pages.Text(p), insert: true);
        Assert.Equal(4, cache.Count);
        // Touch page 0 (a hit), then insert a fifth: page 1 is the least recently used and goes.
        Assert.True(cache.TryEncode(0, Pages.Sparse(Pages.Text(0), 2, 1), delta) > 0);
        cache.Update(4, Pages.Text(4), insert: true);
        Assert.True(cache.Contains(0));
        Assert.False(cache.Contains(1));
        Assert.Equal(4, cache.Count);
        Assert.Equal(-1, cache.TryEncode(1, Pages.Text(1), delta));
        // A hit stores the new content: the next delta is against it.
        byte[] v1 = Pages.Sparse(Pages.Text(0), 2, 1), v2 = Pages.Sparse(v1, 1, 2);
        int n = cache.TryEncode(0, v2, delta);
        byte[] t = (byte[])v1.Clone();
        XbzrleDelta.Apply(0, delta.AsSpan(0, n), t);
        Assert.Equal(v2, t);
        // Overflow leaves the entry for Update; update without insert does not add.
        Assert.Equal(-2, cache.TryEncode(0, Pages.Random(9), delta));
        cache.Update(99, Pages.Text(9), insert: false);
        Assert.False(cache.Contains(99));

        var big = new XbzrleCache(64L << 20);
        Assert.Equal(16384, big.CapacityPages);
    }

    // ---- entropy and the adaptive decision -------------------------------------------------

    [Fact]
    public void Codec_sampled_entropy_separates_random_text_and_redundant_pages()
    {
        Assert.InRange(ByteEntropy.OfSample(Pages.Random(1)), AdaptivePolicy.IncompressibleBits, 8);
        Assert.InRange(ByteEntropy.OfSample(Pages.Text(1)), AdaptivePolicy.RedundantBits, AdaptivePolicy.IncompressibleBits);
        Assert.InRange(ByteEntropy.OfSample(Pages.Runs(1)), 0, AdaptivePolicy.RedundantBits);
        Assert.Equal(0, ByteEntropy.OfSample(Pages.Zero()), 6);
    }

    private static readonly CodecFigures Lz4 = new(800e6, 0.5), Zstd = new(200e6, 0.3);

    [Theory]
    // Slow link: every saved byte pays; Zstd saves most on ordinary pages, LZ4 on redundant ones.
    [InlineData(5.0, 10e6, AdaptiveChoice.Zstd)]
    [InlineData(2.0, 10e6, AdaptiveChoice.Lz4)]
    // Incompressible: raw whatever the link.
    [InlineData(7.2, 1e6, AdaptiveChoice.Raw)]
    // 200 MB/s: encoding and sending overlap, the slower sets the pace. Zstd max(5, 1.5) = 5 ns/B,
    // LZ4 max(1.25, 2.5) = 2.5 ns/B, raw 5 ns/B: LZ4.
    [InlineData(5.0, 200e6, AdaptiveChoice.Lz4)]
    // 1 GB/s: LZ4 max(1.25, 0.5) = 1.25 ns/B > raw 1.0: LZ4 cannot keep up with the link, send raw.
    [InlineData(5.0, 1e9, AdaptiveChoice.Raw)]
    [InlineData(2.0, 1e9, AdaptiveChoice.Raw)]
    // LZ4's break-even is its own speed, 800 MB/s: just under it LZ4 still pays, just over it raw.
    [InlineData(5.0, 790e6, AdaptiveChoice.Lz4)]
    [InlineData(5.0, 810e6, AdaptiveChoice.Raw)]
    // 1 Gbit/s with a slow (busy) CPU: LZ4 at 150 MB/s still keeps up with 125 MB/s and sends half.
    [InlineData(5.0, 125e6, AdaptiveChoice.Lz4, 150e6)]
    [InlineData(5.0, 125e6, AdaptiveChoice.Raw, 110e6)]
    public void Codec_adaptive_policy_compresses_only_while_the_link_is_the_bottleneck(double entropy, double link, AdaptiveChoice expected, double lz4Speed = 0)
    {
        var lz4 = lz4Speed > 0 ? Lz4 with { InputBytesPerSecond = lz4Speed } : Lz4;
        var zstd = lz4Speed > 0 ? Zstd with { InputBytesPerSecond = lz4Speed / 4 } : Zstd;
        Assert.Equal(expected, AdaptivePolicy.Choose(entropy, link, lz4, zstd));
    }

    [Fact]
    public void Codec_adaptive_policy_cpu_bound_and_unknown_link()
    {
        Assert.True(AdaptivePolicy.CpuBound(Lz4, 1e9));
        Assert.False(AdaptivePolicy.CpuBound(Lz4, 100e6));
        // Unknown link (0): taken as 1 Gbit/s, where Zstd wins on ordinary pages with these figures.
        Assert.Equal(AdaptivePolicy.Choose(5, AdaptivePolicy.UnknownLinkBytesPerSecond, Lz4, Zstd), AdaptivePolicy.Choose(5, 0, Lz4, Zstd));
        // Unmeasured codec (0 throughput) is never picked.
        Assert.Equal(AdaptiveChoice.Lz4, AdaptivePolicy.Choose(5, 1e6, Lz4, new CodecFigures(0, 0.1)));
    }

    [Fact]
    public void Codec_adaptive_state_learns_from_what_it_measures_and_probes_the_other_codec()
    {
        var s = new AdaptiveState();
        // A fast link: with the priors, nothing pays.
        Assert.Equal(AdaptiveChoice.Raw, s.Choose(5, 10e9, out bool probe));
        Assert.False(probe);
        int probes = 0;
        for (int i = 0; i < 640; i++) { s.Choose(5, 10e9, out probe); if (probe) probes++; }
        Assert.Equal(10, probes);
        // Measured: LZ4 is in fact very fast here (1 µs a page) and halves pages: at 2 GB/s it now pays.
        for (int i = 0; i < 200; i++) s.Observe(false, AdaptiveChoice.Lz4, System.Diagnostics.Stopwatch.Frequency / 1_000_000, 2048);
        Assert.InRange(s.Figures(false, AdaptiveChoice.Lz4).InputBytesPerSecond, 3.5e9, 4.2e9);
        Assert.Equal(AdaptiveChoice.Lz4, s.Choose(5, 2e9, out _));
    }

    private static long Us(double us) => (long)(us * System.Diagnostics.Stopwatch.Frequency / 1e6);

    /// <summary>Preemption only ever makes a timed page look slower: a few such pages must not change the speed the decision uses.</summary>
    [Fact]
    public void Codec_adaptive_speed_is_a_decaying_median_that_ignores_preempted_pages()
    {
        var s = new AdaptiveState();
        for (int i = 0; i < 40; i++) s.Observe(false, AdaptiveChoice.Lz4, Us(10), 2048); // 10 µs a page: 410 MB/s
        Assert.Equal(409.6e6, s.Figures(false, AdaptiveChoice.Lz4).InputBytesPerSecond, 1e3);
        // The thread lost its core for 5 ms during 5 of the next 15 pages (a third of the window).
        for (int i = 0; i < 15; i++) s.Observe(false, AdaptiveChoice.Lz4, i % 3 == 0 ? Us(5000) : Us(10), 2048);
        Assert.Equal(409.6e6, s.Figures(false, AdaptiveChoice.Lz4).InputBytesPerSecond, 1e3);
        // Over a 1 Gbit/s link LZ4 keeps up and halves the bytes: compress, not raw.
        Assert.Equal(AdaptiveChoice.Lz4, s.Choose(5, 125e6, out _));
    }

    /// <summary>A codec that really became slow (the CPU is busy for good) is judged slow once most of the window says so.</summary>
    [Fact]
    public void Codec_adaptive_speed_follows_a_lasting_slowdown_and_a_recovery()
    {
        var s = new AdaptiveState();
        for (int i = 0; i < AdaptiveState.Window; i++) s.Observe(false, AdaptiveChoice.Lz4, Us(10), 2048);
        for (int i = 0; i < AdaptiveState.Window / 2 + 1; i++) s.Observe(false, AdaptiveChoice.Lz4, Us(100), 2048); // 41 MB/s
        Assert.Equal(40.96e6, s.Figures(false, AdaptiveChoice.Lz4).InputBytesPerSecond, 1e3);
        Assert.True(AdaptivePolicy.CpuBound(s.Figures(false, AdaptiveChoice.Lz4), 125e6));
        Assert.NotEqual(AdaptiveChoice.Lz4, s.Choose(5, 125e6, out _));
        // The first pages after start-up ran unoptimised code; once the JIT is done they are fast again.
        for (int i = 0; i < AdaptiveState.Window / 2 + 1; i++) s.Observe(false, AdaptiveChoice.Lz4, Us(10), 2048);
        Assert.Equal(409.6e6, s.Figures(false, AdaptiveChoice.Lz4).InputBytesPerSecond, 1e3);
    }

    /// <summary>A clock that advances by a scripted step at every reading: codec timings are exactly what the test says.</summary>
    private sealed class ScriptedClock(Func<long, long> stepTicks) : TimeProvider
    {
        private long _now = 1, _reads;
        public override long TimestampFrequency => 1_000_000; // µs
        public override long GetTimestamp() => _now += stepTicks(_reads++);
    }

    /// <summary>
    /// The whole encoder on a busy machine, deterministic: every compression takes 8 µs but one in
    /// five is preempted for 4 ms. Over a 1 Gbit/s link the text pages must still be compressed,
    /// and once paused (the stop-and-copy) no codec is probed.
    /// </summary>
    [Fact]
    public void Codec_adaptive_encoder_keeps_compressing_on_a_preempted_thread_and_never_probes_when_paused()
    {
        const int N = 640;
        // Each timed compression reads the clock twice: the second reading's step is its duration.
        var clock = new ScriptedClock(read => read % 2 == 0 ? 1 : (read / 2) % 5 == 4 ? 4000 : 8);
        using var pipeline = new SourcePipeline(new PipelineOptions { Compression = CompressionKind.Adaptive }, N, time: clock);
        pipeline.Link.Set(125e6);
        var enc = pipeline.CreateEncoder();
        var buf = new byte[PageCodec.MaxEncodedSize];
        var counts = new EncodingCounters();
        enc.BeginRound(0);
        for (int p = 0; p < N; p++)
        {
            var e = enc.Encode(p, Pages.Text(p), buf, out int n);
            counts.Add(e, n);
        }
        var adaptive = pipeline.Report()["adaptive"].Counters;
        Assert.Equal(0, adaptive["cpuBound"]);
        Assert.Equal(N, counts.Pages(PageEncoding.Lz4) + counts.Pages(PageEncoding.Zstd));
        Assert.True(adaptive["probes"] > 0);
        long probes = adaptive["probes"];
        pipeline.Paused = true;
        enc.BeginRound(1);
        for (int p = 0; p < N; p++) enc.Encode(p, Pages.Text(p + N), buf, out _);
        Assert.Equal(probes, pipeline.Report()["adaptive"].Counters["probes"]);
    }

    /// <summary>
    /// Incompressible memory costs the adaptive stage almost nothing: a run of incompressible
    /// samples makes it look at fewer pages (up to 1 in 64), and the first compressible page it
    /// samples brings it back to every page — at most 63 compressible pages go raw on the way.
    /// </summary>
    [Fact]
    public void Codec_adaptive_encoder_samples_sparsely_inside_incompressible_memory_and_recovers_at_once()
    {
        const int Random = 2000, Text = 200;
        // Every timed compression takes 8 ticks of the scripted clock (as in the test above): fast codecs, whatever the JIT does.
        var clock = new ScriptedClock(read => read % 2 == 0 ? 1 : 8);
        using var pipeline = new SourcePipeline(new PipelineOptions { Compression = CompressionKind.Adaptive }, Random + Text, time: clock);
        pipeline.Link.Set(125e6);
        var enc = pipeline.CreateEncoder();
        var buf = new byte[PageCodec.MaxEncodedSize];
        var rng = new Random(5);
        var page = new byte[GuestMemory.PageSize];
        var counts = new EncodingCounters();
        enc.BeginRound(0);
        for (int p = 0; p < Random; p++) { rng.NextBytes(page); counts.Add(enc.Encode(p, page, buf, out int n), n); }
        Assert.Equal(Random, counts.Pages(PageEncoding.Raw));
        long unsampled = pipeline.Report()["adaptive"].Counters["unsampled"];
        Assert.InRange(unsampled, Random * 0.8, Random - 8); // most pages not looked at, the first eight always
        var textCounts = new EncodingCounters();
        for (int p = 0; p < Text; p++) textCounts.Add(enc.Encode(Random + p, Pages.Text(p), buf, out int n), n);
        long compressed = textCounts.Pages(PageEncoding.Lz4) + textCounts.Pages(PageEncoding.Zstd);
        Assert.True(compressed >= Text - 63, $"{compressed} of {Text} compressed; raw {textCounts.Pages(PageEncoding.Raw)}; adaptive {string.Join(", ", pipeline.Report()["adaptive"].Counters.Select(kv => $"{kv.Key}={kv.Value}"))}");
        // Interleaved memory never forms a run: every compressible page is looked at and compressed.
        var mixed = new EncodingCounters();
        for (int p = 0; p < 400; p++)
        {
            if (p % 2 == 0) { rng.NextBytes(page); enc.Encode(p, page, buf, out _); }
            else mixed.Add(enc.Encode(p, Pages.Text(p), buf, out int n), n);
        }
        Assert.Equal(200, mixed.Pages(PageEncoding.Lz4) + mixed.Pages(PageEncoding.Zstd));
    }

    [Fact]
    public void Codec_link_estimate_takes_the_cap_or_the_measured_rate()
    {
        var limiter = new RateLimiter(0);
        var link = new LinkEstimate(limiter);
        Assert.Equal(0, link.BytesPerSecond);
        link.Observe(1 << 20, System.Diagnostics.Stopwatch.Frequency / 1000, System.Diagnostics.Stopwatch.Frequency); // 1 MiB in 1 ms
        Assert.InRange(link.BytesPerSecond, 1.0e9, 1.1e9);
        limiter.BytesPerSecond = 100 << 20;
        Assert.Equal(100 << 20, link.BytesPerSecond);
    }

    // ---- the composed pipeline ---------------------------------------------------------------

    public static IEnumerable<object[]> PipelineSettings() =>
    [
        [new PipelineOptions { Compression = CompressionKind.Lz4 }],
        [new PipelineOptions { Compression = CompressionKind.Zstd, CompressionLevel = 5 }],
        [new PipelineOptions { Compression = CompressionKind.Adaptive }],
        [new PipelineOptions { XbzrleCacheBytes = 1 << 20 }],
        [new PipelineOptions { Dedup = true }],
        [PipelineOptions.All],
    ];

    /// <summary>Source memory changes over rounds; every round goes through encoder and decoder; the destination must equal the source after each.</summary>
    [Theory]
    [MemberData(nameof(PipelineSettings))]
    public void Codec_pipeline_round_trips_pages_over_rounds(PipelineOptions options)
    {
        const int N = 64;
        using var src = GuestMemory.Create(N * Size, "codec-src");
        using var dst = GuestMemory.Create(N * Size, "codec-dst");
        for (int p = 0; p < N; p++)
            ((p % 4) switch { 0 => Pages.Text(p), 1 => Pages.Random(p), 2 => Pages.Runs(p), _ => Pages.Text(p % 8) }).CopyTo(src.Page(p));
        using var pipeline = new SourcePipeline(options, N);
        pipeline.Link.Set(10e6); // a slow link: the adaptive stage compresses
        var enc = pipeline.CreateEncoder();
        using var dec = new PipelineDecoder(dst, options.Capabilities | Capabilities.Raw | Capabilities.ZeroPages, new DedupStore());
        var buf = new byte[PageCodec.MaxEncodedSize];
        var rng = new Random(3);
        var counts = new EncodingCounters();
        for (int round = 0; round < 5; round++)
        {
            enc.BeginRound(round);
            for (int p = 0; p < N; p++)
            {
                var e = enc.Encode(p, src.Page(p), buf, out int n);
                Assert.InRange(n, 0, PageCodec.MaxEncodedSize);
                counts.Add(e, n);
                dec.Decode(p, e, buf.AsSpan(0, n), dst.Page(p));
                Assert.True(src.Page(p).SequenceEqual(dst.Page(p)), $"round {round} page {p} ({e}) differs");
            }
            // The guest writes: sparse changes, a page zeroed, a page copied onto another.
            for (int k = 0; k < 20; k++) BinaryPrimitives.WriteInt64LittleEndian(src.Page(rng.Next(N)).Slice(rng.Next(Size / 8) * 8), rng.NextInt64());
            src.Page(rng.Next(N)).Clear();
            src.Page(rng.Next(N)).CopyTo(src.Page(rng.Next(N)));
        }
        var stages = pipeline.Report();
        if (options.Compression == CompressionKind.Lz4) Assert.True(counts.Pages(PageEncoding.Lz4) > 0);
        if (options.Compression == CompressionKind.Zstd) Assert.True(counts.Pages(PageEncoding.Zstd) > 0);
        if (options.Compression == CompressionKind.Adaptive)
        {
            Assert.True(counts.Pages(PageEncoding.Zstd) + counts.Pages(PageEncoding.Lz4) > 0);
            Assert.True(stages["adaptive"].Counters["incompressible"] > 0);
        }
        if (options.XbzrleCacheBytes > 0)
        {
            Assert.True(counts.Pages(PageEncoding.Xbzrle) > 0);
            Assert.True(stages["xbzrle"].Counters["cacheHits"] > 0);
            Assert.True(stages["xbzrle"].Counters["cacheMisses"] > 0);
            Assert.True(stages["xbzrle"].BytesSaved > 0);
        }
        if (options.Dedup)
        {
            Assert.True(counts.Pages(PageEncoding.Dedup) > 0);
            Assert.Equal(counts.Pages(PageEncoding.Dedup), stages["dedup"].PagesEncoded);
            Assert.Equal(stages["dedup"].PagesEncoded * (Size - PipelineEncoder.DedupPayloadSize), stages["dedup"].BytesSaved);
        }
        foreach (var s in stages.Values) Assert.True(s.CpuMs >= 0 && s.PagesEncoded <= s.PagesOffered);
    }

    /// <summary>One encoder per thread over a shared pipeline (cache, link estimate): each thread's pages decode right, and the counters add up.</summary>
    [Fact]
    public void Codec_encoders_on_several_threads_share_the_pipeline_safely()
    {
        const int N = 512, Threads = 4;
        using var src = GuestMemory.Create(N * Size, "codec-mt-src");
        using var dst = GuestMemory.Create(N * Size, "codec-mt-dst");
        for (int p = 0; p < N; p++) ((p % 3) switch { 0 => Pages.Text(p), 1 => Pages.Random(p), _ => Pages.Runs(p) }).CopyTo(src.Page(p));
        var options = new PipelineOptions { Compression = CompressionKind.Adaptive, XbzrleCacheBytes = 2 * N * Size };
        using var pipeline = new SourcePipeline(options, N);
        pipeline.Link.Set(50e6);
        var decoders = Enumerable.Range(0, Threads).Select(_ => new PipelineDecoder(dst, options.Capabilities | Capabilities.Raw | Capabilities.ZeroPages)).ToArray();
        long entries = 0;
        for (int round = 0; round < 4; round++)
        {
            Parallel.For(0, Threads, new ParallelOptions { MaxDegreeOfParallelism = Threads }, t =>
            {
                var enc = pipeline.CreateEncoder();
                enc.BeginRound(round);
                var buf = new byte[PageCodec.MaxEncodedSize];
                for (int p = t; p < N; p += Threads) // each thread owns its pages, as a parallel engine would partition them
                {
                    var e = enc.Encode(p, src.Page(p), buf, out int n);
                    decoders[t].Decode(p, e, buf.AsSpan(0, n), dst.Page(p));
                    Interlocked.Increment(ref entries);
                }
            });
            for (int p = 0; p < N; p++) Assert.True(src.Page(p).SequenceEqual(dst.Page(p)), $"round {round} page {p} differs");
            var rng = new Random(round);
            for (int k = 0; k < 200; k++) BinaryPrimitives.WriteInt64LittleEndian(src.Page(rng.Next(N)).Slice(rng.Next(Size / 8) * 8), rng.NextInt64());
        }
        var stages = pipeline.Report();
        Assert.Equal(entries, stages["adaptive"].PagesOffered + stages["xbzrle"].PagesEncoded);
        Assert.True(stages["xbzrle"].Counters["cacheHits"] > 0);
        Assert.True(pipeline.Cache!.Count <= pipeline.Cache.CapacityPages);
        foreach (var d in decoders) d.Dispose();
    }

    /// <summary>
    /// One round 0 of <paramref name="src"/> through a dedup-only encoder and a decoder into fresh
    /// memory (a reference to a page the decoder cannot verify throws); the encodings, the dedup
    /// stage's report, and whether the destination ended equal to the source.
    /// </summary>
    private static (PageEncoding[] Encodings, LiveMig.Reporting.StageReport Dedup, bool Equal) DedupRound0(GuestMemory src)
    {
        long n = src.PageCount;
        using var dst = GuestMemory.Create(src.Size, "codec-dedup-dst");
        var options = new PipelineOptions { Dedup = true };
        using var pipeline = new SourcePipeline(options, n);
        var enc = pipeline.CreateEncoder();
        using var dec = new PipelineDecoder(dst, options.Capabilities | Capabilities.Raw | Capabilities.ZeroPages);
        var buf = new byte[PageCodec.MaxEncodedSize];
        enc.BeginRound(0);
        var encodings = new PageEncoding[n];
        for (long p = 0; p < n; p++)
        {
            encodings[p] = enc.Encode(p, src.Page(p), buf, out int written);
            dec.Decode(p, encodings[p], buf.AsSpan(0, written), dst.Page(p));
        }
        return (encodings, pipeline.Report()["dedup"], src.ComputeHash() == dst.ComputeHash());
    }

    [Fact]
    public void Codec_dedup_steps_aside_in_memory_without_duplicates_and_comes_back_at_a_hit()
    {
        // Unique pages (twice the run after which dedup steps aside), then 256 copies of the very first, then unique again.
        const int Unique = 2 * PipelineEncoder.DedupMissRun, Copies = 256, N = Unique + Copies + 2048;
        using var src = GuestMemory.Create((long)N * Size, "codec-dedup-sample");
        for (int p = 0; p < N; p++) Pages.Random(p + 1).CopyTo(src.Page(p));
        for (int p = Unique; p < Unique + Copies; p++) src.Page(0).CopyTo(src.Page(p));
        var (encodings, c, equal) = DedupRound0(src);
        Assert.Equal(N, c.PagesOffered);
        // Past DedupMissRun misses it passes pages by: one in two, then three in four once the run is twice as long.
        Assert.InRange(c.Counters["unsampled"], PipelineEncoder.DedupMissRun / 3, Unique / 2);
        // Page 0 was looked at (and indexed): the first copy dedup looks at is found (within 64
        // pages), and from that hit on it looks at every page again, so all the later copies too.
        int firstHit = Array.IndexOf(encodings, PageEncoding.Dedup);
        Assert.InRange(firstHit, Unique, Unique + 63);
        Assert.All(encodings[firstHit..(Unique + Copies)], e => Assert.Equal(PageEncoding.Dedup, e));
        Assert.Equal(Unique + Copies - firstHit, c.Counters["withinVm"]);
        Assert.True(equal, "the destination differs from the source");
    }

    [Fact]
    public void Codec_dedup_never_refers_to_a_page_it_passed_by()
    {
        // Unique pages until dedup steps aside, then every page a copy of one passed by or looked
        // at: only the latter may be named as holders (the others were never hashed into the index).
        const int Run = PipelineEncoder.DedupMissRun, N = 3 * Run;
        using var src = GuestMemory.Create((long)N * Size, "codec-dedup-passed");
        for (int p = 0; p < 2 * Run; p++) Pages.Random(p + 1).CopyTo(src.Page(p));
        for (int p = 2 * Run; p < N; p++) src.Page(Run + (p - 2 * Run)).CopyTo(src.Page(p)); // copies of pages it looked at and passed by
        var (_, c, equal) = DedupRound0(src);
        Assert.True(c.Counters["unsampled"] > 0);
        Assert.True(c.Counters["withinVm"] > 0); // the copies of pages it did look at are still found
        Assert.True(equal, "the destination differs from the source");
    }

    [Fact]
    public void Codec_destination_can_index_a_vm_once_it_arrived_instead_of_page_by_page()
    {
        const int N = 16;
        using var dst = GuestMemory.Create(N * Size, "codec-arrived");
        var store = new DedupStore();
        using var dec = new PipelineDecoder(dst, Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Dedup, store) { IndexPlacedPages = false };
        for (int p = 0; p < N - 4; p++) dec.Decode(p, PageEncoding.Raw, Pages.Text(p), dst.Page(p));
        dec.Decode(N - 4, PageEncoding.Zero, [], dst.Page(N - 4));
        Assert.Equal(0, store.Count); // nothing while the pages arrive
        Assert.Equal(N - 4, store.AddArrived(dst, dec.Received)); // placed, non-zero pages only
        var target = new byte[Size];
        Assert.True(store.TryFill(ContentHash.Of(Pages.Text(3)), target, out _));
        Assert.Equal(Pages.Text(3), target);
    }

    [Fact]
    public void Codec_dedup_index_drops_a_holder_whose_content_was_resent()
    {
        var index = new DedupSourceIndex(8);
        UInt128 a = ContentHash.Of(Pages.Text(1)), b = ContentHash.Of(Pages.Text(2));
        index.Sent(3, a);
        index.Sent(5, a); // same content elsewhere: 3 stays the holder
        Assert.Equal(3, index.Holder(a));
        index.Sent(3, b);
        Assert.Equal(-1, index.Holder(a)); // dropped, though 5 still holds it: safe, never wrong
        Assert.Equal(3, index.Holder(b));
        index.Sent(3, DedupSourceIndex.None);
        Assert.Equal(-1, index.Holder(b));
    }

    [Fact]
    public void Codec_dedup_store_uses_only_verified_copies()
    {
        var store = new DedupStore();
        var mem = GuestMemory.Create(4 * Size, "codec-store");
        byte[] text = Pages.Text(1);
        text.CopyTo(mem.Page(2));
        UInt128 h = ContentHash.Of(text);
        store.Add(h, mem, 2);
        var target = new byte[Size];
        Assert.True(store.TryFill(h, target, out _));
        Assert.Equal(text, target);
        // Overwritten since: the copy does not verify, the entry goes.
        mem.Page(2)[10] ^= 1;
        Assert.False(store.TryFill(h, target, out bool touched));
        Assert.True(touched);
        Assert.Equal(0, store.Count);
        // Disposed memory: skipped, never read.
        text.CopyTo(mem.Page(1));
        store.Add(h, mem, 1);
        mem.Dispose();
        Assert.False(store.TryFill(h, target, out touched));
        Assert.False(touched);
        Assert.False(store.TryFill(ContentHash.Of(Pages.Text(9)), target, out touched));
        Assert.False(touched);
    }

    [Fact]
    public void Codec_decoder_refuses_references_deltas_and_encodings_it_cannot_honour()
    {
        const int N = 8;
        using var dst = GuestMemory.Create(N * Size, "codec-bad");
        using var dec = new PipelineDecoder(dst, Capabilities.Raw | Capabilities.ZeroPages | Capabilities.Xbzrle | Capabilities.Dedup);
        byte[] text = Pages.Text(1);
        dec.Decode(1, PageEncoding.Raw, text, dst.Page(1));

        // A delta against a page never received.
        var e = Assert.Throws<ProtocolException>(() => dec.Decode(2, PageEncoding.Xbzrle, [0, 1, 7], dst.Page(2)));
        Assert.Equal("XBZRLE delta for page 2, which this destination never received (no base to apply it to)", e.Message);

        // A reference to content the destination does not hold there.
        var r = new byte[PipelineEncoder.DedupPayloadSize];
        BinaryPrimitives.WriteUInt32LittleEndian(r, 1);
        ContentHash.Write(ContentHash.Of(Pages.Text(2)), r.AsSpan(4));
        e = Assert.Throws<ProtocolException>(() => dec.Decode(3, PageEncoding.Dedup, r, dst.Page(3)));
        Assert.StartsWith("dedup reference for page 3: this destination does not hold content ", e.Message);
        Assert.EndsWith("at page 1 (its content differs)", e.Message);
        Assert.True(dst.Page(3).SequenceEqual(new byte[Size]));
        BinaryPrimitives.WriteUInt32LittleEndian(r, 4);
        Assert.EndsWith("at page 4 (never received)", Assert.Throws<ProtocolException>(() => dec.Decode(3, PageEncoding.Dedup, r, dst.Page(3))).Message);
        BinaryPrimitives.WriteUInt32LittleEndian(r, 99);
        Assert.Contains("names page 99, outside guest memory of 8 pages", Assert.Throws<ProtocolException>(() => dec.Decode(3, PageEncoding.Dedup, r, dst.Page(3))).Message);
        // The right hash: copied.
        BinaryPrimitives.WriteUInt32LittleEndian(r, 1);
        ContentHash.Write(ContentHash.Of(text), r.AsSpan(4));
        dec.Decode(3, PageEncoding.Dedup, r, dst.Page(3));
        Assert.True(dst.Page(3).SequenceEqual(text));

        // Not negotiated.
        e = Assert.Throws<ProtocolException>(() => dec.Decode(5, PageEncoding.Lz4, [1, 2, 3], dst.Page(5)));
        Assert.Equal("page 5 uses encoding lz4 (2), which was not negotiated", e.Message);
        Assert.Contains("unknown page encoding 9", Assert.Throws<ProtocolException>(() => dec.Decode(5, (PageEncoding)9, [], dst.Page(5))).Message);
    }

    [Fact]
    public void Codec_options_name_their_capabilities_and_check_levels()
    {
        Assert.Equal(Capabilities.Lz4 | Capabilities.Zstd | Capabilities.Xbzrle | Capabilities.Dedup, PipelineOptions.All.Capabilities);
        Assert.Equal((Capabilities)0, new PipelineOptions { SkipFreePages = true }.Capabilities);
        Assert.True(new PipelineOptions().IsBaseline);
        Assert.Equal("compress=zstd:7 xbzrle=64.0 MiB dedup skip-free-pages", (PipelineOptions.All with { Compression = CompressionKind.Zstd, CompressionLevel = 7 }).ToString());
        Assert.Throws<ArgumentException>(() => new PipelineOptions { Compression = CompressionKind.Lz4, CompressionLevel = 13 }.Validate());
        Assert.Throws<ArgumentException>(() => new PipelineOptions { Compression = CompressionKind.Zstd, CompressionLevel = 20 }.Validate());
        Assert.Throws<ArgumentException>(() => new PipelineOptions { XbzrleCacheBytes = 100 }.Validate());
    }
}
