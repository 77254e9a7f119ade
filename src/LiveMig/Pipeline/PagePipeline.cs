using System.IO.Hashing;
using System.Buffers.Binary;
using System.Diagnostics;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Reporting;

namespace LiveMig.Pipeline;

/// <summary>
/// Counters of one stage in one encoder (or decoder). Plain fields: each instance belongs to
/// one thread; <see cref="SourcePipeline.Report"/> adds the instances up.
/// </summary>
public sealed class StageCounters(string name, params string[] extraNames)
{
    public string Name { get; } = name;
    public string[] ExtraNames { get; } = extraNames;
    public long Offered, Encoded, BytesOut, Ticks;
    public readonly long[] Extra = new long[extraNames.Length];

    public void Merge(StageCounters other)
    {
        Offered += other.Offered; Encoded += other.Encoded; BytesOut += other.BytesOut; Ticks += other.Ticks;
        for (int i = 0; i < Extra.Length; i++) Extra[i] += other.Extra[i];
    }

    public StageReport ToReport()
    {
        long bytesIn = Encoded * GuestMemory.PageSize;
        var counters = new Dictionary<string, long>();
        for (int i = 0; i < Extra.Length; i++) counters[ExtraNames[i]] = Extra[i];
        return new StageReport
        {
            PagesOffered = Offered, PagesEncoded = Encoded, BytesIn = bytesIn, BytesOut = BytesOut, BytesSaved = bytesIn - BytesOut,
            CpuMs = Ticks * 1000.0 / Stopwatch.Frequency, Counters = counters,
        };
    }
}

/// <summary>Stage names as the report shows them, and the extra counters of each.</summary>
public static class Stages
{
    public const string Dedup = "dedup", Xbzrle = "xbzrle", Lz4 = "lz4", Zstd = "zstd", Adaptive = "adaptive", FreePages = "free-pages";

    // XBZRLE extras
    public const int CacheHits = 0, CacheMisses = 1, Overflows = 2;
    public static StageCounters NewXbzrle() => new(Xbzrle, "cacheHits", "cacheMisses", "overflows");

    // Dedup extras
    public const int WithinVm = 0, GangQueried = 1, GangFilled = 2, DedupUnsampled = 3;
    public static StageCounters NewDedup() => new(Dedup, "withinVm", "gangQueried", "gangFilled", "unsampled");

    // Compressor extras: pages where the result did not save an eighth of the page (sent otherwise).
    public const int Rejected = 0;
    public static StageCounters NewLz4() => new(Lz4, "rejected");
    public static StageCounters NewZstd() => new(Zstd, "rejected");

    // Adaptive extras: what it chose per page, and why.
    public const int ChoseRaw = 0, ChoseLz4 = 1, ChoseZstd = 2, Incompressible = 3, CpuBound = 4, Probes = 5, Unsampled = 6;
    public static StageCounters NewAdaptive() => new(Adaptive, "raw", "lz4", "zstd", "incompressible", "cpuBound", "probes", "unsampled");

    public static StageCounters NewFreePages() => new(FreePages);
}

/// <summary>
/// The source half of the page pipeline for one migration: the settings, the state shared by
/// every encoder (XBZRLE cache, dedup index, link estimate) and the encoders it made (one per
/// sending thread). A page goes through the stages in this order; the first that takes it wins:
/// <code>
/// zero? → zero marker
/// dedup: content the destination holds (same hash)? → reference
/// xbzrle: in the cache (rounds ≥ 1)? → delta, if it saves an eighth of the page
/// compression (lz4 | zstd | adaptive) → compressed, if it saves an eighth
/// raw
/// </code>
/// Free-page skipping happens before any of this, in the engine (round 0 never reads them).
/// </summary>
public sealed class SourcePipeline : IDisposable
{
    private readonly List<PipelineEncoder> _encoders = [];

    /// <param name="streams">Data streams the pages travel on (dedup references stay within one stream).</param>
    /// <param name="time">The clock the codecs are timed with for the adaptive decision (tests give a fake one); default the system's.</param>
    public SourcePipeline(PipelineOptions options, long pageCount, LinkEstimate? link = null, int streams = 1, TimeProvider? time = null)
    {
        options.Validate();
        Options = options;
        Link = link ?? new LinkEstimate();
        Time = time ?? TimeProvider.System;
        if (options.XbzrleCacheBytes > 0) Cache = new XbzrleCache(options.XbzrleCacheBytes);
        if (options.Dedup) DedupIndex = new DedupSourceIndex(pageCount, streams);
    }

    public PipelineOptions Options { get; }
    public LinkEstimate Link { get; }
    public TimeProvider Time { get; }

    /// <summary>
    /// Set by the engine once the VM is paused: the pages sent now are in the downtime, so the
    /// adaptive stage uses its best-known codec and probes none (a probe of a codec not yet used
    /// in this process can cost milliseconds of first-call compilation).
    /// </summary>
    public bool Paused { get => Volatile.Read(ref _paused); set => Volatile.Write(ref _paused, value); }
    private bool _paused;
    public XbzrleCache? Cache { get; }
    public DedupSourceIndex? DedupIndex { get; }

    /// <summary>Pages skipped because the guest reported them free (filled by the engine).</summary>
    public StageCounters FreePages { get; } = Stages.NewFreePages();

    /// <summary>The gang part of dedup: pages queried and filled by the destination before round 0.</summary>
    public StageCounters Gang { get; } = Stages.NewDedup();

    /// <summary>
    /// The destination may not have received <paramref name="pages"/> as last sent (the
    /// connection dropped before it acknowledged them): drop them from the XBZRLE cache and the
    /// dedup index, so no delta or reference is ever made against a copy it may lack.
    /// </summary>
    public void Forget(PageBitmap pages)
    {
        for (long p = pages.NextSet(0); p >= 0; p = pages.NextSet(p + 1))
        {
            Cache?.Remove(p);
            DedupIndex?.Sent(p, DedupSourceIndex.None);
        }
    }

    /// <summary>
    /// A new encoder for one sending thread; it shares this pipeline's cache and index. With
    /// <paramref name="compressionOnly"/> it only compresses (post-copy's push: the destination
    /// VM runs and changes its pages, so neither a delta nor a dedup reference may lean on what
    /// it holds, and the cache and index are no longer kept).
    /// </summary>
    public PipelineEncoder CreateEncoder(bool compressionOnly = false)
    {
        var e = new PipelineEncoder(this, compressionOnly);
        lock (_encoders) _encoders.Add(e);
        return e;
    }

    /// <summary>The report's <c>stages</c>: every stage in use, its encoders' counters added up.</summary>
    public Dictionary<string, StageReport> Report()
    {
        var sum = new Dictionary<string, StageCounters>();
        void Add(StageCounters? c)
        {
            if (c is null) return;
            if (!sum.TryGetValue(c.Name, out var s)) sum[c.Name] = s = new StageCounters(c.Name, c.ExtraNames);
            s.Merge(c);
        }
        lock (_encoders) foreach (var e in _encoders) foreach (var c in e.AllCounters()) Add(c);
        if (Options.Dedup) Add(Gang);
        if (Options.SkipFreePages) Add(FreePages);
        var r = new Dictionary<string, StageReport>();
        foreach (var (name, c) in sum)
        {
            var rep = c.ToReport();
            if (name == Stages.FreePages) rep = rep with { BytesOut = 0, BytesSaved = rep.BytesIn };
            r[name] = rep;
        }
        return r;
    }

    /// <summary>
    /// Free-page hinting: takes the pages <paramref name="reportFree"/> marks free out of
    /// <paramref name="toSend"/> (of <paramref name="offered"/> pages); they are not sent and
    /// stay zero at the destination. Returns how many; counted as skipped in <paramref name="counters"/>.
    /// </summary>
    public long SkipFreePages(Action<PageBitmap> reportFree, PageBitmap toSend, long offered, EncodingCounters counters)
    {
        long t0 = Stopwatch.GetTimestamp();
        var free = new PageBitmap(toSend.PageCount);
        reportFree(free);
        long skipped = toSend.AndNot(free);
        counters.AddSkipped(skipped);
        FreePages.Offered += offered;
        FreePages.Encoded += skipped;
        FreePages.Ticks += Stopwatch.GetTimestamp() - t0;
        return skipped;
    }

    /// <summary>
    /// Pages the destination may already hold from another VM: every page of
    /// <paramref name="toSend"/> that is not zero, with its content hash (for the DedupQuery).
    /// </summary>
    public List<(uint Page, UInt128 Hash)> GangCandidates(GuestMemory memory, PageBitmap toSend)
    {
        long t0 = Stopwatch.GetTimestamp();
        var list = new List<(uint, UInt128)>();
        for (long p = toSend.NextSet(0); p >= 0; p = toSend.NextSet(p + 1))
        {
            ReadOnlySpan<byte> page = memory.Page(p);
            if (PageCodec.IsZero(page)) continue;
            list.Add(((uint)p, ContentHash.Of(page)));
        }
        Gang.Ticks += Stopwatch.GetTimestamp() - t0;
        Gang.Extra[Stages.GangQueried] += list.Count;
        return list;
    }

    /// <summary>The destination filled <paramref name="page"/> with content <paramref name="hash"/> from what it held.</summary>
    public void GangFilled(uint page, UInt128 hash)
    {
        DedupIndex?.Sent(page, hash);
        Gang.Offered++;
        Gang.Encoded++;
        Gang.Extra[Stages.GangFilled]++;
    }

    public void Dispose()
    {
        lock (_encoders) foreach (var e in _encoders) e.Dispose();
    }
}

/// <summary>
/// One sending thread's encoder: the stages of <see cref="SourcePipeline"/> in order, with this
/// thread's scratch buffers, compressor context and counters. Not thread-safe itself; the state
/// it shares (cache, index, link estimate) is.
/// </summary>
public sealed class PipelineEncoder : IPageEncoder, IDisposable
{
    /// <summary>An encoding is used only if it saves at least an eighth of the page: at most this many bytes.</summary>
    public const int Budget = GuestMemory.PageSize - GuestMemory.PageSize / 8;
    public const int DedupPayloadSize = 4 + ContentHash.Size;

    private readonly SourcePipeline _p;
    private readonly byte[] _scratch = new byte[GuestMemory.PageSize]; // a stage's output, before it replaces the raw copy
    private readonly K4os.Compression.LZ4.LZ4Level _lz4Level;
    private readonly ZstdPageCompressor? _zstd;
    private readonly AdaptiveState? _adaptive;
    private readonly StageCounters? _dedup, _xbzrle, _lz4, _zstdC, _adaptiveC;
    private int _round;

    private readonly bool _compressionOnly;

    internal PipelineEncoder(SourcePipeline pipeline, bool compressionOnly = false)
    {
        _p = pipeline;
        _compressionOnly = compressionOnly;
        var o = pipeline.Options;
        if (o.Dedup && !compressionOnly) _dedup = Stages.NewDedup();
        if (o.XbzrleCacheBytes > 0 && !compressionOnly) _xbzrle = Stages.NewXbzrle();
        switch (o.Compression)
        {
            case CompressionKind.Lz4:
                _lz4 = Stages.NewLz4();
                _lz4Level = Lz4Page.Level(o.CompressionLevel ?? Lz4Page.DefaultLevel);
                break;
            case CompressionKind.Zstd:
                _zstdC = Stages.NewZstd();
                _zstd = new ZstdPageCompressor(o.CompressionLevel ?? ZstdPageCompressor.DefaultLevel);
                break;
            case CompressionKind.Adaptive:
                _lz4 = Stages.NewLz4();
                _zstdC = Stages.NewZstd();
                _adaptiveC = Stages.NewAdaptive();
                _lz4Level = Lz4Page.Level(Lz4Page.DefaultLevel);
                _zstd = new ZstdPageCompressor(o.CompressionLevel ?? ZstdPageCompressor.DefaultLevel);
                _adaptive = new AdaptiveState(pipeline.Time.TimestampFrequency);
                WarmCodecs();
                break;
        }
    }

    /// <summary>
    /// Compresses one page with each codec, untimed and uncounted, so that their first-call
    /// compilation (tens of milliseconds for Zstd on a busy machine) is paid before round 0 and
    /// is not mistaken for their speed.
    /// </summary>
    private void WarmCodecs()
    {
        var page = new byte[GuestMemory.PageSize];
        for (int i = 0; i < page.Length; i++) page[i] = (byte)("the quick brown fox jumps over the lazy dog "[i % 44] ^ (i >> 9));
        var output = new byte[GuestMemory.PageSize];
        Lz4Page.Encode(page, output.AsSpan(0, Budget), _lz4Level);
        _zstd!.Encode(page, output.AsSpan(0, Budget));
    }

    internal IEnumerable<StageCounters> AllCounters()
    {
        foreach (var c in new[] { _dedup, _xbzrle, _adaptiveC, _lz4, _zstdC }) if (c is not null) yield return c;
    }

    public void BeginRound(int round) => _round = round;

    /// <summary>
    /// Encodes one page. <paramref name="destination"/> must hold a whole page: the page is read
    /// from guest memory once, straight into it (a raw page, the common case on a fast link, is
    /// thereby copied once), and every stage, the cache and the index see that copy even while
    /// the guest writes the page (the write dirties it again: it is sent later). A stage that
    /// takes the page encodes into this encoder's scratch page, which then replaces the copy.
    /// </summary>
    public PageEncoding Encode(long page, ReadOnlySpan<byte> data, Span<byte> destination, out int written)
    {
        Span<byte> s = destination[..GuestMemory.PageSize];
        data.CopyTo(s);
        Span<byte> o = _scratch;
        UInt128 hash = DedupSourceIndex.None;
        PageEncoding enc;
        written = 0;
        bool dedupSampled = true;
        if (PageCodec.IsZero(s)) enc = PageEncoding.Zero;
        else if (_dedup is not null && (dedupSampled = DedupSampled()) && TryDedup(page, s, o, out hash, out written)) enc = PageEncoding.Dedup;
        else if (_xbzrle is not null && _round > 0 && TryXbzrle(page, s, o, out written)) enc = PageEncoding.Xbzrle;
        else if (TryCompress(s, o, out written, out var compressed)) enc = compressed;
        else
        {
            written = GuestMemory.PageSize;
            enc = PageEncoding.Raw;
        }

        if (!_compressionOnly)
        {
            // Keep the shared models of what the destination holds exact (from the raw copy, before it is replaced).
            // Round 0 neither fills the cache nor finds anything in it to refresh (a reattach may
            // have left entries: then they are refreshed), so no shard is locked for a bulk copy.
            if (_p.Cache is { } cache && enc != PageEncoding.Xbzrle && (_round > 0 || !cache.IsEmpty)) cache.Update(page, s, insert: _round > 0 && enc != PageEncoding.Zero);
            if (_p.DedupIndex is { } index)
            {
                // A page dedup did not look at is not hashed either: it holds no content by this
                // index (so nothing will refer to it), and whatever it held before is forgotten.
                if (enc != PageEncoding.Zero && hash == DedupSourceIndex.None && dedupSampled) hash = ContentHash.Of(s);
                index.Sent(page, enc == PageEncoding.Zero ? DedupSourceIndex.None : hash);
            }
        }
        if (enc is not (PageEncoding.Raw or PageEncoding.Zero))
        {
            // The content this encoding describes is the copy, not the guest's page now: its hash
            // (for verification, and for a dirty log that compares pages with what was sent).
            _contentHash = XxHash3.HashToUInt64(s);
            o[..written].CopyTo(destination);
        }
        return enc;
    }

    private ulong _contentHash;

    public bool TryGetContentHash(out ulong hash)
    {
        hash = _contentHash;
        return true;
    }

    /// <summary>
    /// Whether dedup looks at the next page. Memory without duplicates should cost dedup next to
    /// nothing (issue 11: every stage on incompressible memory ≤ 1.2× the time of none; hashing a
    /// page and two index operations cost about 1 µs a page, a third of a raw page's whole path).
    /// After <see cref="DedupMissRun"/> misses in a row (16 MiB of memory without one duplicate)
    /// the next page is passed by unhashed, after twice as many the next 3, … up to 63 of every
    /// 64; a hit ends the run. What is lost: duplicates among (and of) the pages passed by — in
    /// memory where fewer than 1 page in 4,096 has a twin, at most a page or two per distinct content.
    /// </summary>
    private bool DedupSampled()
    {
        if (_dedupUnsampled == 0) return true;
        _dedupUnsampled--;
        _dedup!.Offered++;
        _dedup.Extra[Stages.DedupUnsampled]++;
        return false;
    }

    private void NoteDedup(bool hit)
    {
        if (hit) { _dedupMissRun = 0; return; }
        _dedupMissRun++;
        if (_dedupMissRun >= DedupMissRun) _dedupUnsampled = (1 << Math.Min(6, _dedupMissRun / DedupMissRun)) - 1;
    }

    /// <summary>Dedup misses in a row after which it starts passing pages by.</summary>
    internal const int DedupMissRun = 4096;

    private int _dedupMissRun, _dedupUnsampled;

    private bool TryDedup(long page, ReadOnlySpan<byte> s, Span<byte> destination, out UInt128 hash, out int written)
    {
        long t0 = Stopwatch.GetTimestamp();
        var c = _dedup!;
        c.Offered++;
        hash = ContentHash.Of(s);
        long holder = _p.DedupIndex!.Holder(hash, page);
        bool hit = holder >= 0;
        written = 0;
        if (hit)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(destination, (uint)holder);
            ContentHash.Write(hash, destination[4..]);
            written = DedupPayloadSize;
            c.Encoded++;
            c.BytesOut += written;
            c.Extra[Stages.WithinVm]++;
        }
        NoteDedup(hit);
        c.Ticks += Stopwatch.GetTimestamp() - t0;
        return hit;
    }

    private bool TryXbzrle(long page, ReadOnlySpan<byte> s, Span<byte> destination, out int written)
    {
        long t0 = Stopwatch.GetTimestamp();
        var c = _xbzrle!;
        c.Offered++;
        int n = _p.Cache!.TryEncode(page, s, destination[..Budget]);
        written = Math.Max(n, 0);
        if (n >= 0) { c.Encoded++; c.BytesOut += n; c.Extra[Stages.CacheHits]++; }
        else if (n == -1) c.Extra[Stages.CacheMisses]++;
        else c.Extra[Stages.Overflows]++;
        c.Ticks += Stopwatch.GetTimestamp() - t0;
        return n >= 0;
    }

    private bool TryCompress(ReadOnlySpan<byte> s, Span<byte> destination, out int written, out PageEncoding enc)
    {
        written = 0;
        enc = PageEncoding.Raw;
        switch (_p.Options.Compression)
        {
            case CompressionKind.Lz4:
                return TryLz4(s, destination, out written, out enc, out _);
            case CompressionKind.Zstd:
                return TryZstd(s, destination, out written, out enc, out _);
            case CompressionKind.Adaptive:
                return TryAdaptive(s, destination, out written, out enc);
            default:
                return false;
        }
    }

    private bool TryLz4(ReadOnlySpan<byte> s, Span<byte> destination, out int written, out PageEncoding enc, out long ticks)
    {
        var time = _p.Time;
        long t0 = time.GetTimestamp();
        var c = _lz4!;
        c.Offered++;
        int n = Lz4Page.Encode(s, destination[..Budget], _lz4Level);
        ticks = time.GetTimestamp() - t0;
        c.Ticks += ToStopwatchTicks(ticks);
        return Took(c, n, PageEncoding.Lz4, out written, out enc);
    }

    private bool TryZstd(ReadOnlySpan<byte> s, Span<byte> destination, out int written, out PageEncoding enc, out long ticks)
    {
        var time = _p.Time;
        long t0 = time.GetTimestamp();
        var c = _zstdC!;
        c.Offered++;
        int n = _zstd!.Encode(s, destination[..Budget]);
        ticks = time.GetTimestamp() - t0;
        c.Ticks += ToStopwatchTicks(ticks);
        return Took(c, n, PageEncoding.Zstd, out written, out enc);
    }

    /// <summary>The counters are in <see cref="Stopwatch"/> ticks; the codecs are timed with the pipeline's clock.</summary>
    private long ToStopwatchTicks(long ticks)
    {
        long f = _p.Time.TimestampFrequency;
        return f == Stopwatch.Frequency ? ticks : (long)(ticks * (double)Stopwatch.Frequency / f);
    }

    private static bool Took(StageCounters c, int n, PageEncoding tag, out int written, out PageEncoding enc)
    {
        if (n < 0) { c.Extra[Stages.Rejected]++; written = 0; enc = PageEncoding.Raw; return false; }
        c.Encoded++;
        c.BytesOut += n;
        written = n;
        enc = tag;
        return true;
    }

    private bool TryAdaptive(ReadOnlySpan<byte> s, Span<byte> destination, out int written, out PageEncoding enc)
    {
        var c = _adaptiveC!;
        c.Offered++;
        if (_unsampled > 0)
        {
            // Inside a run of incompressible samples: raw without looking (see NoteEntropy).
            _unsampled--;
            c.Extra[Stages.ChoseRaw]++;
            c.Extra[Stages.Incompressible]++;
            c.Extra[Stages.Unsampled]++;
            written = 0;
            enc = PageEncoding.Raw;
            return false;
        }
        long t0 = Stopwatch.GetTimestamp();
        double entropy = ByteEntropy.OfSample(s);
        NoteEntropy(entropy);
        double link = _p.Link.BytesPerSecond;
        var choice = _adaptive!.Choose(entropy, link, out bool probe, allowProbe: !_p.Paused);
        bool redundant = entropy < AdaptivePolicy.RedundantBits;
        c.Ticks += Stopwatch.GetTimestamp() - t0;
        if (probe) c.Extra[Stages.Probes]++;
        written = 0;
        enc = PageEncoding.Raw;
        switch (choice)
        {
            case AdaptiveChoice.Lz4:
                c.Extra[Stages.ChoseLz4]++;
                bool lz4 = TryLz4(s, destination, out written, out enc, out long t1);
                _adaptive.Observe(redundant, AdaptiveChoice.Lz4, t1, lz4 ? written : GuestMemory.PageSize);
                if (lz4) { c.Encoded++; c.BytesOut += written; }
                return lz4;
            case AdaptiveChoice.Zstd:
                c.Extra[Stages.ChoseZstd]++;
                bool z = TryZstd(s, destination, out written, out enc, out long t2);
                _adaptive.Observe(redundant, AdaptiveChoice.Zstd, t2, z ? written : GuestMemory.PageSize);
                if (z) { c.Encoded++; c.BytesOut += written; }
                return z;
            default:
                c.Extra[Stages.ChoseRaw]++;
                c.Extra[entropy >= AdaptivePolicy.IncompressibleBits ? Stages.Incompressible : Stages.CpuBound]++;
                return false;
        }
    }

    /// <summary>
    /// Memory that cannot compress should cost the adaptive stage next to nothing (issue 11:
    /// every stage on incompressible memory ≤ 1.2× the time of none; sampling each page's
    /// entropy cost ~0.5–1 µs a page, a third of a raw page's whole path). After 8 incompressible
    /// samples in a row the next page goes raw unsampled, after 16 the next 3, … up to 63 of
    /// every 64; one page that is not incompressible ends the run. What is lost: at most 63 pages
    /// sent raw where incompressible memory turns compressible.
    /// </summary>
    private void NoteEntropy(double entropy)
    {
        if (entropy < AdaptivePolicy.IncompressibleBits) { _incompressibleRun = 0; return; }
        _incompressibleRun++;
        if (_incompressibleRun >= 8) _unsampled = (1 << Math.Min(6, _incompressibleRun / 8)) - 1;
    }

    private int _incompressibleRun, _unsampled;

    public void Dispose() => _zstd?.Dispose();
}

/// <summary>
/// The destination half: decodes every encoding the Hello negotiated and refuses the others;
/// remembers which pages it has received (an XBZRLE delta needs a base); with Dedup, checks
/// every reference against the content it names and indexes placed pages in the
/// destination-wide <see cref="DedupStore"/> for later migrations. One per incoming migration.
/// </summary>
/// <summary>
/// Decodes what post-copy's push may carry: zero, raw, LZ4 and Zstd pages. A delta or a dedup
/// reference would read the destination's memory, where in post-copy the page it leans on may
/// not have arrived (and reading a missing page from managed code is the userfaultfd hazard):
/// refused as a protocol error.
/// </summary>
public sealed class PushDecoder(IPageDecoder inner) : IPageDecoder
{
    public void Decode(long page, PageEncoding encoding, ReadOnlySpan<byte> payload, Span<byte> target)
    {
        if (encoding is PageEncoding.Xbzrle or PageEncoding.Dedup)
            throw new ProtocolException($"{EncodingCounters.Name(encoding)} entry for page {page} after the switch to post-copy: only zero, raw, lz4 and zstd pages may follow it");
        inner.Decode(page, encoding, payload, target);
    }
}

public sealed class PipelineDecoder : IPageDecoder, IDisposable
{
    private readonly GuestMemory _memory;
    private readonly Capabilities _accepted;
    private readonly DedupStore? _store;
    private readonly PageBitmap _received;
    private readonly ZstdPageDecompressor? _zstd;
    private readonly StageCounters?[] _byEncoding = new StageCounters?[EncodingCounters.Kinds];

    /// <param name="received">
    /// Shared with the decoders of the other data streams of the same migration (one decoder per
    /// stream: each has its own decompressor and counters). Every page belongs to one stream and a
    /// bitmap word to one 64-page chunk, so the streams never write the same word.
    /// </param>
    public PipelineDecoder(GuestMemory memory, Capabilities accepted, DedupStore? store = null, PageBitmap? received = null)
    {
        _memory = memory;
        _accepted = accepted;
        _received = received ?? new PageBitmap(memory.PageCount);
        // Decoding counts pages and time; of the encoders' extra counters only dedup's apply here.
        if ((accepted & Capabilities.Zstd) != 0) { _zstd = new ZstdPageDecompressor(); _byEncoding[(int)PageEncoding.Zstd] = new StageCounters(Stages.Zstd); }
        if ((accepted & Capabilities.Lz4) != 0) _byEncoding[(int)PageEncoding.Lz4] = new StageCounters(Stages.Lz4);
        if ((accepted & Capabilities.Xbzrle) != 0) _byEncoding[(int)PageEncoding.Xbzrle] = new StageCounters(Stages.Xbzrle);
        if ((accepted & Capabilities.Dedup) != 0)
        {
            _byEncoding[(int)PageEncoding.Dedup] = Stages.NewDedup();
            _store = store;
        }
    }

    /// <summary>Pages placed so far (by any encoding, or filled from the dedup store).</summary>
    public PageBitmap Received => _received;

    /// <summary>
    /// Whether each placed page goes into the destination-wide dedup store as it is placed (true),
    /// or the incoming migration indexes them all once the VM runs here
    /// (<see cref="DedupStore.AddArrived"/>; a migration that may switch to post-copy places its
    /// last pages elsewhere, so it indexes as it goes).
    /// </summary>
    public bool IndexPlacedPages { get; init; } = true;

    public void Decode(long page, PageEncoding encoding, ReadOnlySpan<byte> payload, Span<byte> target)
    {
        long t0 = Stopwatch.GetTimestamp();
        switch (encoding)
        {
            case PageEncoding.Raw or PageEncoding.Zero:
                BasicPageDecoder.Instance.Decode(page, encoding, payload, target);
                break;
            case PageEncoding.Lz4:
                Require(Capabilities.Lz4, page, encoding);
                Lz4Page.Decode(page, payload, target);
                break;
            case PageEncoding.Zstd:
                Require(Capabilities.Zstd, page, encoding);
                _zstd!.Decode(page, payload, target);
                break;
            case PageEncoding.Xbzrle:
                Require(Capabilities.Xbzrle, page, encoding);
                if (!_received.IsSet(page))
                    throw new ProtocolException($"XBZRLE delta for page {page}, which this destination never received (no base to apply it to)");
                XbzrleDelta.Apply(page, payload, target);
                break;
            case PageEncoding.Dedup:
                Require(Capabilities.Dedup, page, encoding);
                ApplyReference(page, payload, target);
                _byEncoding[(int)PageEncoding.Dedup]!.Extra[Stages.WithinVm]++;
                break;
            default:
                throw new ProtocolException($"unknown page encoding {(byte)encoding} for page {page} (not negotiated or not known)");
        }
        _received.SetUnsynchronized(page);
        if (_store is not null && IndexPlacedPages && encoding != PageEncoding.Zero) _store.Add(ContentHash.Of(target), _memory, page);
        if (_byEncoding[(int)encoding] is { } c)
        {
            c.Offered++;
            c.Encoded++;
            c.BytesOut += payload.Length;
            c.Ticks += Stopwatch.GetTimestamp() - t0;
        }
    }

    private void Require(Capabilities bit, long page, PageEncoding encoding)
    {
        if ((_accepted & bit) == 0)
            throw new ProtocolException($"page {page} uses encoding {EncodingCounters.Name(encoding)} ({(byte)encoding}), which was not negotiated");
    }

    private void ApplyReference(long page, ReadOnlySpan<byte> payload, Span<byte> target)
    {
        if (payload.Length != PipelineEncoder.DedupPayloadSize)
            throw new ProtocolException($"dedup reference for page {page} has {payload.Length} bytes, not {PipelineEncoder.DedupPayloadSize}");
        uint holder = BinaryPrimitives.ReadUInt32LittleEndian(payload);
        UInt128 hash = ContentHash.Read(payload[4..]);
        if (holder >= _memory.PageCount)
            throw new ProtocolException($"dedup reference for page {page} names page {holder}, outside guest memory of {_memory.PageCount} pages");
        // Never trust the reference: the holder must have exactly this content now, or memory would be corrupted.
        ReadOnlySpan<byte> source = _memory.Page(holder);
        if (!_received.IsSet(holder) || ContentHash.Of(source) != hash)
            throw new ProtocolException($"dedup reference for page {page}: this destination does not hold content {hash:x32} at page {holder} ({(_received.IsSet(holder) ? "its content differs" : "never received")})");
        if (holder != page) source.CopyTo(target);
    }

    /// <summary>
    /// Answers a DedupQuery: fills each queried page whose content the destination-wide store
    /// holds (copy, then verify the copy's hash) and reports which. Only before round 0.
    /// </summary>
    public bool[] Fill(ReadOnlySpan<byte> query, Action<long>? placed = null)
    {
        int count = DedupQuery.Count(query);
        var filled = new bool[count];
        for (int i = 0; i < count; i++)
        {
            var (page, hash) = DedupQuery.Entry(query, i);
            if (page >= _memory.PageCount) throw new ProtocolException($"DedupQuery entry {i}: page {page} is outside guest memory of {_memory.PageCount} pages");
            if (_received.IsSet(page)) throw new ProtocolException($"DedupQuery entry {i}: page {page} is already placed");
            if (_store is null) continue;
            Span<byte> target = _memory.Page(page);
            if (_store.TryFill(hash, target, out bool touched))
            {
                filled[i] = true;
                _received.SetUnsynchronized(page);
                _store.Add(hash, _memory, page);
                placed?.Invoke(page);
            }
            else if (touched)
            {
                target.Clear(); // as it was: nothing is placed before round 0
            }
        }
        if (_byEncoding[(int)PageEncoding.Dedup] is { } c)
        {
            c.Extra[Stages.GangQueried] += count;
            long n = filled.Count(f => f);
            c.Extra[Stages.GangFilled] += n;
            c.Offered += n;
            c.Encoded += n;
        }
        return filled;
    }

    /// <summary>The destination report's <c>stages</c>: one per negotiated codec, as decoded.</summary>
    public Dictionary<string, StageReport> Report()
    {
        var r = new Dictionary<string, StageReport>();
        foreach (var c in _byEncoding) if (c is not null) r[c.Name] = c.ToReport();
        return r;
    }

    public void Dispose() => _zstd?.Dispose();
}
