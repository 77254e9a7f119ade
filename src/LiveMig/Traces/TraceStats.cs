namespace LiveMig.Traces;

/// <summary>Shares of page writes by content.</summary>
public sealed record ContentMix(long Pages, double Zero, double Compressible, double Incompressible, double Duplicate)
{
    public static ContentMix Of(IEnumerable<TraceInterval> intervals)
    {
        long n = 0, zero = 0, comp = 0, incomp = 0, dup = 0;
        foreach (var iv in intervals)
            foreach (var c in iv.Content)
            {
                n++;
                switch (c)
                {
                    case PageContent.Zero: zero++; break;
                    case PageContent.Incompressible: incomp++; break;
                    case PageContent.Duplicate: dup++; break;
                    default: comp++; break;
                }
            }
        double d = Math.Max(n, 1);
        return new ContentMix(n, zero / d, comp / d, incomp / d, dup / d);
    }
}

/// <summary>Distinct pages written within windows of one length, one value per window start (an interval's start).</summary>
public sealed record WorkingSetCurve(TimeSpan Window, double[] StartSeconds, int[] Pages)
{
    public double MeanPages => Pages.Length == 0 ? 0 : Pages.Average();
    public int MaxPages => Pages.Length == 0 ? 0 : Pages.Max();
}

/// <summary>
/// What <c>livemig trace show</c> says about a trace: dirty rate over time, the writable working
/// set for several window lengths (Clark et al. 2005), and the content mix. Pure: from a read trace.
/// </summary>
public sealed record TraceStats
{
    public required TraceFile Trace { get; init; }
    public required double[] IntervalStartSeconds { get; init; }
    /// <summary>Pages written per second in each interval after the initial image.</summary>
    public required double[] DirtyRate { get; init; }
    public required IReadOnlyList<WorkingSetCurve> WorkingSets { get; init; }
    public required ContentMix InitialImage { get; init; }
    public required ContentMix Writes { get; init; }
    public required double MedianBytesChanged { get; init; }
    public required double MeanBytesChanged { get; init; }

    public static readonly TimeSpan[] DefaultWindows = [TimeSpan.FromMilliseconds(100), TimeSpan.FromMilliseconds(500), TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(2), TimeSpan.FromSeconds(5), TimeSpan.FromSeconds(10)];

    public static TraceStats Of(TraceFile t, IReadOnlyList<TimeSpan>? windows = null)
    {
        var ivs = t.Intervals.Skip(1).ToArray();
        var starts = ivs.Select(i => i.Start.TotalSeconds).ToArray();
        var rate = ivs.Select(i => i.Duration > TimeSpan.Zero ? i.Count / i.Duration.TotalSeconds : 0).ToArray();
        // Windows no shorter than an interval (nothing finer was recorded) and no longer than the trace.
        var lengths = (windows ?? DefaultWindows).Where(w => w <= t.End.Duration && w >= t.Header.NominalInterval).ToList();
        if (lengths.Count == 0 && t.End.Duration > TimeSpan.Zero) lengths.Add(t.End.Duration);
        var changed = ivs.SelectMany(i => i.BytesChanged).Select(b => (int)b).Order().ToArray();
        return new TraceStats
        {
            Trace = t, IntervalStartSeconds = starts, DirtyRate = rate,
            WorkingSets = lengths.Select(w => WorkingSet(ivs, Math.Max(t.End.PageSpace, 1), w)).ToList(),
            InitialImage = ContentMix.Of(t.Intervals.Take(1)), Writes = ContentMix.Of(ivs),
            MedianBytesChanged = changed.Length == 0 ? 0 : changed[changed.Length / 2],
            MeanBytesChanged = changed.Length == 0 ? 0 : changed.Average(),
        };
    }

    /// <summary>For each interval start s: distinct pages written by the intervals that start in [s, s + window). Sliding, with a count per page.</summary>
    public static WorkingSetCurve WorkingSet(IReadOnlyList<TraceInterval> ivs, int pageSpace, TimeSpan window)
    {
        var count = new int[pageSpace];
        int distinct = 0, end = 0;
        var starts = new List<double>();
        var pages = new List<int>();
        for (int s = 0; s < ivs.Count; s++)
        {
            // Only windows that fit in the trace: a window cut short by the end would understate the set.
            if (ivs[s].Start + window > ivs[^1].Start + ivs[^1].Duration + TimeSpan.FromTicks(1)) break;
            while (end < ivs.Count && ivs[end].Start < ivs[s].Start + window)
            {
                foreach (int p in ivs[end].Pages) if (count[p]++ == 0) distinct++;
                end++;
            }
            starts.Add(ivs[s].Start.TotalSeconds);
            pages.Add(distinct);
            foreach (int p in ivs[s].Pages) if (--count[p] == 0) distinct--;
        }
        return new WorkingSetCurve(window, [.. starts], [.. pages]);
    }
}
