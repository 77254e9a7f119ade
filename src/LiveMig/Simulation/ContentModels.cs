using System.Numerics;
using LiveMig.Memory;
using LiveMig.Traces;

namespace LiveMig.Simulation;

/// <summary>The pages of one round by what the codecs make of them (<see cref="PageContent"/>), with the bytes changed since each was last sent.</summary>
public sealed class RoundContent
{
    public const int Classes = 7;
    /// <summary>Pages per <see cref="PageContent"/>; fractional for a statistical model.</summary>
    public readonly double[] Pages = new double[Classes];
    /// <summary>Sum over the pages of each class of the bytes changed since the page was last sent (XBZRLE's delta depends on it).</summary>
    public readonly double[] BytesChanged = new double[Classes];

    public void Clear()
    {
        Array.Clear(Pages);
        Array.Clear(BytesChanged);
    }

    public double Total => Pages.Sum();
}

/// <summary>What the pages hold, for the codec models: classifies a round's pages.</summary>
public interface IContentModel
{
    /// <summary>
    /// Counts the <paramref name="count"/> pages set in <paramref name="pages"/> by content into
    /// <paramref name="into"/> (cleared first). <paramref name="initialImage"/>: round 0, the pages
    /// as they were when the migration began; else pages written since.
    /// </summary>
    /// <param name="written">With <paramref name="initialImage"/>: the pages the guest has written since it started (null when <see cref="NeedsWrittenPages"/> is false): those hold written content, not the image's.</param>
    void Classify(PageBitmap pages, long count, bool initialImage, RoundContent into, PageBitmap? written = null);

    /// <summary>Whether round 0 must know which pages the guest wrote before it (a statistical model whose written pages differ from the image: a fill's zero page written once is no longer zero).</summary>
    bool NeedsWrittenPages => false;

    /// <summary>The pages went on the wire: their bytes changed count from zero again.</summary>
    void Sent(PageBitmap pages) { }

    /// <summary>
    /// The share of the initial image's pages that are holes — zero pages never populated, which
    /// the engine's post-copy leaves out of the pages to come (a statistical model's zero pages;
    /// a trace's absent pages are not in its populated set at all). Pre-copy's round 0 sends no
    /// zero page either.
    /// </summary>
    double HoleShare => 0;
}

/// <summary>Which pages of a statistical image are its holes: a fixed hash of the page number below the share (deterministic, spread evenly).</summary>
internal static class ImageHoles
{
    /// <summary>Clears from <paramref name="pages"/> the image's holes that the guest has not written since it started (<paramref name="written"/>, if known).</summary>
    public static void Remove(PageBitmap pages, double share, PageBitmap? written)
    {
        if (!(share > 0)) return;
        ulong limit = share >= 1 ? ulong.MaxValue : (ulong)(share * 18446744073709551616.0);
        ulong[] words = pages.Words;
        ulong[]? w = written?.Words;
        for (long i = 0; i < words.Length; i++)
        {
            ulong bits = words[i] & ~(w?[i] ?? 0);
            ulong holes = 0;
            while (bits != 0)
            {
                int b = System.Numerics.BitOperations.TrailingZeroCount(bits);
                bits &= bits - 1;
                ulong x = (ulong)(i * 64 + b) + 0x9E3779B97F4A7C15UL;
                x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
                x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
                if ((x ^ (x >> 31)) < limit || share >= 1) holes |= 1UL << b;
            }
            words[i] &= ~holes;
        }
    }
}

/// <summary>Counting the pages of a round the guest wrote before (statistical content models).</summary>
internal static class WrittenPages
{
    /// <summary>Pages set in both; 0 without <paramref name="written"/>.</summary>
    public static long Among(PageBitmap pages, PageBitmap? written)
    {
        if (written is null) return 0;
        ulong[] a = pages.Words, b = written.Words;
        long n = 0;
        for (int i = 0; i < a.Length; i++) n += BitOperations.PopCount(a[i] & b[i]);
        return n;
    }
}

/// <summary>Shares of pages by content (the rest is incompressible); <see cref="Compressible"/> pages are like the micro-benchmarks' text pages.</summary>
public sealed record ContentShares(double Zero = 0, double Duplicate = 0, double Compressible = 0)
{
    public double Incompressible => Math.Max(0, 1 - Zero - Duplicate - Compressible);

    internal void Check(string what)
    {
        foreach (var (name, v) in new[] { ("zero", Zero), ("duplicate", Duplicate), ("compressible", Compressible) })
            if (!(v >= 0 && v <= 1)) throw new ArgumentOutOfRangeException(name, v, $"{what} share {name} must be 0..1");
        if (Zero + Duplicate + Compressible > 1 + 1e-9) throw new ArgumentException($"{what} shares add up to more than 1 ({Zero + Duplicate + Compressible:0.###})");
    }
}

/// <summary>
/// A content model given by hand: the initial image and the pages written afterwards each as
/// shares of zero, duplicate, compressible (text-like) and incompressible pages, and the bytes a
/// page has changed by when it is sent again. Statistical: a round of n pages holds n × share of
/// each (split by largest remainder, so the classes add up to n) — which pages are which is not
/// tracked, so this costs nothing per page.
/// </summary>
public sealed class ContentMixModel : IContentModel
{
    public ContentMixModel(ContentShares image, ContentShares? written = null, double bytesChanged = PageClasses.PageSize)
    {
        image.Check("content");
        (written ?? image).Check("written content");
        if (!(bytesChanged >= 1 && bytesChanged <= PageClasses.PageSize)) throw new ArgumentOutOfRangeException(nameof(bytesChanged), bytesChanged, $"bytes changed must be 1..{PageClasses.PageSize}");
        Image = image;
        Written = written ?? image;
        BytesChangedPerPage = bytesChanged;
    }

    public ContentShares Image { get; }
    public ContentShares Written { get; }
    public double BytesChangedPerPage { get; }

    public bool NeedsWrittenPages => Image != Written;

    public double HoleShare => Image.Zero;

    public void Classify(PageBitmap pages, long count, bool initialImage, RoundContent into, PageBitmap? written = null)
    {
        into.Clear();
        long rewritten = initialImage ? WrittenPages.Among(pages, written) : count;
        Add(into, Image, count - rewritten);
        Add(into, Written, rewritten);
        for (int c = 1; c < RoundContent.Classes; c++) into.BytesChanged[c] = into.Pages[c] * BytesChangedPerPage;
    }

    private static void Add(RoundContent into, ContentShares s, long count)
    {
        into.Pages[(int)PageContent.Zero] += count * s.Zero;
        into.Pages[(int)PageContent.Duplicate] += count * s.Duplicate;
        into.Pages[(int)PageContent.SomewhatCompressible] += count * s.Compressible;
        into.Pages[(int)PageContent.Incompressible] += count * s.Incompressible;
    }
}

/// <summary>
/// A recorded trace (docs/trace-format.md) as the guest's dirty process and its content model:
/// the trace's page <i>i</i> is guest page <i>i</i> (as the <c>trace</c> workload replays it);
/// interval 0 is the memory present at the start, each later interval's pages are written at its
/// end, with the content and bytes changed it records. With <see cref="Loop"/> the writes start
/// over (from interval 1) when the trace ends; without, the guest is idle after it. Per page it
/// keeps one content byte and the bytes changed since the page was last sent.
/// </summary>
public sealed class TraceDirtyProcess : IDirtyProcess, IContentModel
{
    private const byte Absent = 255;
    private readonly TraceFile _trace;
    private readonly double[] _ends;      // each interval's end, trace seconds
    private readonly double[] _writesThrough; // page writes of intervals 1..i
    private readonly byte[] _content;
    private readonly ushort[] _changed;
    private readonly double _offset, _loopStart, _period;
    private int _next = 1;
    private long _lap;

    /// <param name="offset">Trace seconds at the guest's progress 0 (where the replay starts).</param>
    public TraceDirtyProcess(TraceFile trace, bool loop, double offset = 0)
    {
        if (trace.Intervals.Count == 0) throw new ArgumentException("the trace has no intervals", nameof(trace));
        _trace = trace;
        Loop = loop;
        _offset = offset;
        PageCount = Math.Max(1, trace.End.PageSpace);
        int n = trace.Intervals.Count;
        _ends = new double[n];
        _writesThrough = new double[n];
        for (int i = 0; i < n; i++)
        {
            var iv = trace.Intervals[i];
            _ends[i] = (iv.Start + iv.Duration).TotalSeconds;
            _writesThrough[i] = i == 0 ? 0 : _writesThrough[i - 1] + iv.Count;
        }
        _loopStart = n > 1 ? trace.Intervals[1].Start.TotalSeconds : 0;
        _period = n > 1 ? _ends[^1] - _loopStart : 0;
        if (Loop && !(_period > 0)) Loop = false; // nothing to repeat
        _content = new byte[PageCount];
        Array.Fill(_content, Absent);
        _changed = new ushort[PageCount];
        Apply(trace.Intervals[0], null);
        // The replay starts at the offset: what the trace wrote before it is the memory's content then.
        while (NextEnd() <= _offset && Step(null) is not null) { }
    }

    public bool Loop { get; }
    public long PageCount { get; }
    public TraceFile Trace => _trace;

    /// <summary>The trace time at which the next interval's writes land (infinity when the trace is over and does not loop).</summary>
    private double NextEnd() => _next < _ends.Length ? _ends[_next] + _lap * _period : double.PositiveInfinity;

    /// <summary>Applies the next interval and moves on; returns it, or null when there is none.</summary>
    private TraceInterval? Step(PageBitmap? into)
    {
        if (_next >= _ends.Length) return null;
        var iv = _trace.Intervals[_next];
        Apply(iv, into);
        if (++_next == _ends.Length && Loop)
        {
            _next = 1;
            _lap++;
        }
        return iv;
    }

    private long Apply(TraceInterval iv, PageBitmap? into)
    {
        long newly = 0;
        ulong[]? words = into?.Words;
        for (int k = 0; k < iv.Count; k++)
        {
            int p = iv.Pages[k];
            if (p >= _content.Length) continue;
            _content[p] = (byte)iv.Content[k];
            _changed[p] = (ushort)Math.Min(PageClasses.PageSize, _changed[p] + iv.BytesChanged[k]);
            if (words is null) continue;
            ulong bit = 1UL << (p & 63);
            if ((words[p >> 6] & bit) == 0)
            {
                words[p >> 6] |= bit;
                newly++;
            }
        }
        return newly;
    }

    public void Populated(PageBitmap into)
    {
        for (int p = 0; p < _content.Length; p++)
            if (_content[p] != Absent) into.SetUnsynchronized(p);
    }

    public long Write(double from, double to, PageBitmap? into)
    {
        long newly = 0;
        double until = _offset + to;
        while (NextEnd() <= until)
        {
            var iv = _trace.Intervals[_next];
            Step(null);
            if (into is not null) newly += Mark(iv, into);
        }
        return newly;
    }

    private static long Mark(TraceInterval iv, PageBitmap into)
    {
        long newly = 0;
        ulong[] words = into.Words;
        foreach (int p in iv.Pages)
        {
            if (p >= into.PageCount) continue;
            ulong bit = 1UL << (p & 63);
            if ((words[p >> 6] & bit) == 0)
            {
                words[p >> 6] |= bit;
                newly++;
            }
        }
        return newly;
    }

    /// <summary>The index of the first interval (from 1) that ends after trace time <paramref name="t"/> within one pass, by binary search.</summary>
    private int FirstEndingAfter(double t)
    {
        int lo = 1, hi = _ends.Length;
        while (lo < hi)
        {
            int mid = (lo + hi) / 2;
            if (_ends[mid] <= t) lo = mid + 1; else hi = mid;
        }
        return lo;
    }

    public double WritesUpTo(double t) => Cumulative(_offset + t) - Cumulative(_offset);

    /// <summary>Page writes the trace made by trace time <paramref name="t"/> (laps included).</summary>
    private double Cumulative(double t)
    {
        if (_ends.Length < 2) return 0;
        double perLap = _writesThrough[^1];
        if (!Loop || t <= _ends[^1]) return _writesThrough[FirstEndingAfter(t) - 1];
        long laps = (long)Math.Floor((t - _loopStart) / _period);
        double within = t - laps * _period;
        return laps * perLap + _writesThrough[FirstEndingAfter(within) - 1];
    }

    public double RateAt(double t)
    {
        if (_ends.Length < 2) return 0;
        double at = _offset + t;
        if (Loop && at > _ends[^1]) at -= Math.Floor((at - _loopStart) / _period) * _period;
        int i = FirstEndingAfter(at);
        if (i >= _ends.Length) return 0;
        var iv = _trace.Intervals[i];
        return iv.Duration > TimeSpan.Zero ? iv.Count / iv.Duration.TotalSeconds : 0;
    }

    public void Classify(PageBitmap pages, long count, bool initialImage, RoundContent into, PageBitmap? written = null)
    {
        into.Clear();
        ulong[] words = pages.Words;
        for (int i = 0; i < words.Length; i++)
        {
            ulong w = words[i];
            while (w != 0)
            {
                long p = (long)i * 64 + BitOperations.TrailingZeroCount(w);
                w &= w - 1;
                byte c = p < _content.Length ? _content[p] : Absent;
                if (c == Absent) { into.Pages[(int)PageContent.Zero]++; continue; }
                into.Pages[c]++;
                into.BytesChanged[c] += _changed[p];
            }
        }
    }

    public void Sent(PageBitmap pages)
    {
        ulong[] words = pages.Words;
        for (int i = 0; i < words.Length; i++)
        {
            ulong w = words[i];
            while (w != 0)
            {
                long p = (long)i * 64 + BitOperations.TrailingZeroCount(w);
                w &= w - 1;
                if (p < _changed.Length) _changed[p] = 0;
            }
        }
    }
}
