using LiveMig.Core;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Traces;

namespace LiveMig.Simulation;

/// <summary>
/// The simulator's <see cref="IRoundSender"/>: it does not move bytes or time. SendRound counts
/// what the round puts on the wire — the pages by content (<see cref="IContentModel"/>) through
/// the page pipeline's stages in the engine's order (zero marker, dedup reference, XBZRLE delta
/// from round 1, compression, raw; round 0 leaves zero pages out) at the codec models' bytes,
/// plus the entries' and batches' framing — and the encoder's CPU seconds; the driver
/// (<see cref="SimMigration"/>) puts that many bytes on the network as a flow no faster than the
/// encoder (the engine overlaps encoding and sending: the slower sets the pace), and reports
/// each Sync's round trip. The switch-over cost is the engine's formula: two round trips at the
/// smallest Sync and the VM state at the bandwidth.
/// </summary>
public sealed class SimRoundSender : IRoundSender
{
    private readonly IContentModel _content;
    private readonly RoundContent _classes = new();
    private readonly PageBitmap? _cached;
    private readonly long _cacheCapacityPages;
    private long _cachedPages;
    private TimeSpan _minSync = TimeSpan.MaxValue;

    public SimRoundSender(IContentModel content, SimPipeline pipeline, long pageCount)
    {
        _content = content;
        Pipeline = pipeline;
        if (pipeline.XbzrleCacheBytes > 0)
        {
            _cached = PageBitmap.Compact(pageCount);
            _cacheCapacityPages = Math.Max(1, pipeline.XbzrleCacheBytes / GuestMemory.PageSize);
        }
    }

    public SimPipeline Pipeline { get; }
    /// <summary>The link speed the adaptive stage assumes (bytes/s): set by the driver as rounds measure it.</summary>
    public double LinkEstimate { get; set; } = AdaptivePolicy.UnknownLinkBytesPerSecond;
    /// <summary>The pages the guest has written since it started (for a content model that needs them), or null.</summary>
    public PageBitmap? WrittenPages { get; set; }
    /// <summary>The VM state's size: part of the switch-over's cost.</summary>
    public long StateBytes { get; set; }
    /// <summary>The bandwidth the state is sent at, bytes/s (0: unknown, the state's time is left out).</summary>
    public Func<double> Bandwidth { get; set; } = () => 0;
    /// <summary>Encoder CPU seconds of the last round counted.</summary>
    public double LastCpuSeconds { get; private set; }
    /// <summary>Pages by how they went on the wire (the report's pagesByEncoding).</summary>
    public Dictionary<string, double> PagesByEncoding { get; } = new() { ["raw"] = 0, ["zero"] = 0, ["lz4"] = 0, ["zstd"] = 0, ["xbzrle"] = 0, ["dedup"] = 0 };
    public double CpuSeconds { get; private set; }

    public RoundSent SendRound(int round, bool final, PageBitmap pages, long count, bool skipZero, PageBitmap? rewritten, CancellationToken cancel)
    {
        _content.Classify(pages, count, initialImage: round == 0, _classes, WrittenPages);
        double hitShare = round >= 1 && _cached is not null ? CacheHitShare(pages, count) : 0;
        double entries = 0, zeroMarkers = 0, payload = 0, cpu = 0;
        for (int c = 0; c < RoundContent.Classes; c++)
        {
            double n = _classes.Pages[c];
            if (n <= 0) continue;
            var content = (PageContent)c;
            if (content == PageContent.Zero)
            {
                cpu += n / CodecModel.ZeroCheckPagesPerSecond;
                if (skipZero) continue; // the destination's memory starts zero
                entries += n;
                zeroMarkers += n;
                PagesByEncoding["zero"] += n;
                continue;
            }
            entries += n;
            if (Pipeline.Dedup) cpu += n / CodecModel.DedupPagesPerSecond;
            if (content == PageContent.Duplicate)
            {
                if (Pipeline.Dedup)
                {
                    payload += n * CodecModel.DedupReferenceBytes;
                    PagesByEncoding["dedup"] += n;
                    continue;
                }
                content = PageContent.SomewhatCompressible; // a duplicate's own content is unknown: taken as text-like
            }
            double rest = n;
            if (hitShare > 0)
            {
                double hits = n * hitShare;
                cpu += hits / CodecModel.XbzrlePagesPerSecond;
                double delta = _classes.BytesChanged[c] / n * CodecModel.XbzrleBytesPerChangedByte;
                if (delta <= CodecModel.KeepLimit)
                {
                    payload += hits * delta;
                    PagesByEncoding["xbzrle"] += hits;
                    rest -= hits;
                }
            }
            if (rest <= 0) continue;
            var choice = CodecModel.Choose(Pipeline.Compression, content, LinkEstimate);
            var (bytes, seconds) = CodecModel.Compress(choice, content);
            if (Pipeline.Compression == SimCompression.Adaptive) seconds += CodecModel.AdaptiveSampleSeconds;
            payload += rest * bytes;
            cpu += rest * seconds;
            string name = bytes >= CodecModel.PageSize ? "raw" : choice == AdaptiveChoice.Zstd ? "zstd" : "lz4";
            PagesByEncoding[name] += rest;
        }
        if (_cached is not null && round >= 1)
        {
            // A miss in a round ≥ 1 inserts the page; round 0 does not fill the cache (as the engine, as QEMU).
            _cached.Or(pages);
            _cachedPages = _cached.Count();
        }
        _content.Sent(pages);
        double wire = entries * CodecModel.EntryHeaderBytes + payload;
        double batches = Math.Ceiling(wire / CodecModel.BatchBytes);
        LastCpuSeconds = cpu;
        CpuSeconds += cpu;
        return new RoundSent((long)Math.Round(entries), (long)Math.Round(wire + batches * CodecModel.BatchFramingBytes), (long)Math.Round(zeroMarkers), 0);
    }

    /// <summary>Of the round's pages, the share found in the XBZRLE cache: those sent in an earlier round ≥ 1, scaled down when they outnumber what the cache holds (an LRU keeps only so many).</summary>
    private double CacheHitShare(PageBitmap pages, long count)
    {
        if (count == 0 || _cachedPages == 0) return 0;
        long inCache = 0;
        ulong[] a = pages.Words, b = _cached!.Words;
        for (int i = 0; i < a.Length; i++) inCache += System.Numerics.BitOperations.PopCount(a[i] & b[i]);
        double share = (double)inCache / count;
        return _cachedPages > _cacheCapacityPages ? share * _cacheCapacityPages / _cachedPages : share;
    }

    /// <summary>The driver models Sync itself; this only keeps the interface's contract.</summary>
    public void Sync(int round) { }

    /// <summary>A Sync took <paramref name="took"/> (the driver measured it on the virtual clock).</summary>
    public void Synced(TimeSpan took)
    {
        if (took < _minSync) _minSync = took;
    }

    public void EndRound(RoundStats stats) { }

    public TimeSpan SwitchoverCost
    {
        get
        {
            var trips = _minSync == TimeSpan.MaxValue ? TimeSpan.Zero : _minSync * 2;
            double bw = Bandwidth();
            return bw > 0 && StateBytes > 0 ? trips + TimeSpan.FromSeconds(StateBytes / bw) : trips;
        }
    }
}
