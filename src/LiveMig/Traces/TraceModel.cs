namespace LiveMig.Traces;

/// <summary>
/// What a written page held at the end of the interval, as far as the codecs care: zero (sent as a
/// marker), one of five compressibility classes (by LZ4's size for the page), or a copy of
/// another page (dedup's case).
/// </summary>
public enum PageContent : byte
{
    Zero = 0,
    /// <summary>LZ4 shrinks it to at most 1/8.</summary>
    VeryCompressible = 1,
    /// <summary>To at most 3/8.</summary>
    Compressible = 2,
    /// <summary>To at most 5/8.</summary>
    SomewhatCompressible = 3,
    /// <summary>To at most 7/8 (the pipeline's limit for sending it compressed).</summary>
    BarelyCompressible = 4,
    /// <summary>LZ4 saves less than an eighth: sent raw.</summary>
    Incompressible = 5,
    /// <summary>Same bytes as the page named by <see cref="TraceInterval.DuplicateOf"/>.</summary>
    Duplicate = 6,
}

/// <summary>Class boundaries and the ratio replay aims at for each class.</summary>
public static class PageClasses
{
    public const int PageSize = 4096;

    /// <summary>The class of a page that is neither zero nor a duplicate, from its LZ4 size (-1 or ≥ a page: did not shrink).</summary>
    public static PageContent FromCompressedSize(int compressed) => compressed switch
    {
        < 0 => PageContent.Incompressible,
        <= PageSize / 8 => PageContent.VeryCompressible,
        <= PageSize * 3 / 8 => PageContent.Compressible,
        <= PageSize * 5 / 8 => PageContent.SomewhatCompressible,
        <= PageSize * 7 / 8 => PageContent.BarelyCompressible,
        _ => PageContent.Incompressible,
    };

    /// <summary>The share of a page replay fills with random bytes for a class (the rest compresses to almost nothing).</summary>
    public static double RandomShare(PageContent c) => c switch
    {
        PageContent.VeryCompressible => 0.06,
        PageContent.Compressible => 0.25,
        PageContent.SomewhatCompressible => 0.5,
        PageContent.BarelyCompressible => 0.75,
        _ => 1.0,
    };
}

/// <summary>Fixed facts about a trace, at the start of the file.</summary>
public sealed record TraceHeader
{
    public int PageSize { get; init; } = PageClasses.PageSize;
    /// <summary>The interval the recorder aimed at (actual intervals carry their own times).</summary>
    public TimeSpan NominalInterval { get; init; } = TimeSpan.FromMilliseconds(100);
    public DateTimeOffset Started { get; init; }
    /// <summary>What was recorded (the command line, or the pid and its name); file text, escape before printing.</summary>
    public string Source { get; init; } = "";
}

/// <summary>Why a recording ended.</summary>
public enum TraceEndReason : byte
{
    /// <summary>The duration ran out, or the recorder was stopped (Ctrl-C).</summary>
    Completed = 0,
    /// <summary>The traced process exited; the trace holds every full interval before that.</summary>
    TargetExited = 1,
}

/// <summary>The seal: last record of a complete trace.</summary>
public sealed record TraceEnd
{
    public int Intervals { get; init; }
    /// <summary>Pages in the trace's page space (every page index is below this).</summary>
    public int PageSpace { get; init; }
    public TimeSpan Duration { get; init; }
    public TraceEndReason Reason { get; init; }
    /// <summary>A human note (e.g. the target's exit status); file text, escape before printing.</summary>
    public string Note { get; init; } = "";
}

/// <summary>
/// The pages written in one interval [Start, Start + Duration) of the trace, sorted by page
/// index, with each page's content at the interval's end. Index 0 is the initial image: every
/// page present when the recording started, with BytesChanged = the page size.
/// Arrays are parallel, one entry per written page.
/// </summary>
public sealed class TraceInterval
{
    public required int Index { get; init; }
    /// <summary>From the start of the recording.</summary>
    public required TimeSpan Start { get; init; }
    public required TimeSpan Duration { get; init; }
    /// <summary>Pages in the page space at the end of this interval (new mappings grow it).</summary>
    public required int PageSpace { get; init; }
    public required int[] Pages { get; init; }
    public required PageContent[] Content { get; init; }
    /// <summary>For <see cref="PageContent.Duplicate"/>: the page index it copies; else -1.</summary>
    public required int[] DuplicateOf { get; init; }
    /// <summary>Bytes that differ from the page's content at the previous interval's end (1..page size).</summary>
    public required ushort[] BytesChanged { get; init; }

    public int Count => Pages.Length;
    public bool IsInitialImage => Index == 0;
}
