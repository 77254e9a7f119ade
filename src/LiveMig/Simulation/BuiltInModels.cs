using LiveMig.Memory;
using LiveMig.Traces;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Simulation;

/// <summary>
/// The simulator's models of the built-in VM (<see cref="BuiltInVm"/>): its workloads as dirty
/// processes and its memory fills as content models, so a scenario can describe a VM that
/// <c>livemig validate</c> also runs for real (a VM with <c>workload: "random:rate=20000,range=32MiB"</c>
/// and <c>fill: mixed</c>). Each model follows the workload's code: random writes uniformly over its
/// range, hotcold by its Zipf law over its working set, sweep page after page through each vCPU's
/// slice; kv and trace are not modelled here (a recorded trace is its own model: <c>trace:</c>).
/// </summary>
public static class BuiltInModels
{
    /// <summary>Bytes a built-in write changes: random and hotcold write 8 bytes, sweep one.</summary>
    public const double RandomWriteBytes = 8;

    /// <summary>The workloads this models (the others are refused with why).</summary>
    public static readonly string[] Modelled = ["idle", "random", "hotcold", "sweep"];

    /// <summary>The dirty process of <paramref name="spec"/> on a VM of <paramref name="pages"/> pages and <paramref name="vcpus"/> vCPUs; throws <see cref="FormatException"/> saying why it cannot be modelled.</summary>
    public static IDirtyProcess Dirty(WorkloadSpec spec, long pages, int vcpus, ulong seed)
    {
        switch (spec.Name)
        {
            case "idle":
                spec.CheckKnown();
                return DirtyModel.Constant(pages, 0);
            case "random":
            {
                spec.CheckKnown("rate", "range");
                long range = spec.Pages("range", pages, pages);
                return DirtyModel.Constant(pages, PacedRate(spec, 20000), range, seed);
            }
            case "hotcold":
            {
                spec.CheckKnown("wss", "skew", "rate");
                long wss = spec.Pages("wss", Math.Max(1, pages / 10), pages);
                return new ZipfDirtyModel(pages, wss, spec.Double("skew", 0.99, 0.01, 5), PacedRate(spec, 50000), seed);
            }
            case "sweep":
            {
                spec.CheckKnown("range", "rate");
                long range = spec.Pages("range", pages, pages);
                return new SweepDirtyProcess(pages, range, vcpus, PacedRate(spec, 0));
            }
            default:
                throw new FormatException($"workload '{spec.Name}' is not modelled by the simulator (modelled: {string.Join(", ", Modelled)}; a recorded trace goes as trace:)");
        }
    }

    /// <summary>The workload's rate; its "0 = as fast as the vCPU can" has no rate to model.</summary>
    private static double PacedRate(WorkloadSpec spec, double fallback)
    {
        double rate = spec.Double("rate", fallback, 0, 1e12);
        if (rate <= 0) throw new FormatException($"workload '{spec.Name}' with rate=0 writes as fast as its vCPUs can, which depends on the machine: give a rate");
        return rate;
    }

    /// <summary>
    /// The content of a fill (<see cref="MemoryFiller"/>) and of the pages the workload writes
    /// later. Mixed: 35% zero (holes: round 0 does not send them), 25% random, 40% text (the codec
    /// benchmarks' text page, the ≤ 5/8 LZ4 band). A written page keeps its content but for the
    /// bytes written, so a zero page written once holds a few bytes: very compressible.
    /// </summary>
    public static IContentModel Content(MemoryFill fill, string workload)
    {
        double changed = workload == "sweep" ? 1 : RandomWriteBytes;
        var image = new double[RoundContent.Classes];
        var written = new double[RoundContent.Classes];
        switch (fill)
        {
            case MemoryFill.Zero:
                image[(int)PageContent.Zero] = 1;
                written[(int)PageContent.VeryCompressible] = 1;
                break;
            case MemoryFill.Random:
                image[(int)PageContent.Incompressible] = written[(int)PageContent.Incompressible] = 1;
                break;
            default:
                image[(int)PageContent.Zero] = 0.35;
                written[(int)PageContent.VeryCompressible] = 0.35;
                image[(int)PageContent.Incompressible] = written[(int)PageContent.Incompressible] = 0.25;
                image[(int)PageContent.SomewhatCompressible] = written[(int)PageContent.SomewhatCompressible] = 0.40;
                break;
        }
        return new ClassMixModel(image, written, changed);
    }
}

/// <summary>
/// A content model as shares of each content class (<see cref="PageContent"/>), for the initial
/// image and for pages written later, and the bytes a written page has changed by. Statistical,
/// as <see cref="ContentMixModel"/>: a round of n pages holds n × share of each class.
/// </summary>
public sealed class ClassMixModel : IContentModel
{
    private readonly double[] _image, _written;

    public ClassMixModel(IReadOnlyList<double> image, IReadOnlyList<double> written, double bytesChanged)
    {
        _image = Checked(image, nameof(image));
        _written = Checked(written, nameof(written));
        if (!(bytesChanged >= 0 && bytesChanged <= PageClasses.PageSize)) throw new ArgumentOutOfRangeException(nameof(bytesChanged), bytesChanged, $"bytes changed must be 0..{PageClasses.PageSize}");
        BytesChangedPerPage = bytesChanged;
    }

    public IReadOnlyList<double> Image => _image;
    public IReadOnlyList<double> Written => _written;
    public double BytesChangedPerPage { get; }

    private static double[] Checked(IReadOnlyList<double> shares, string name)
    {
        if (shares.Count != RoundContent.Classes) throw new ArgumentException($"{name}: one share per content class ({RoundContent.Classes})", name);
        if (shares.Any(s => !(s >= 0 && s <= 1))) throw new ArgumentOutOfRangeException(name, "each share must be 0..1");
        double sum = shares.Sum();
        if (Math.Abs(sum - 1) > 1e-6) throw new ArgumentException($"{name}: the shares add up to {sum:0.####}, not 1", name);
        return [.. shares];
    }

    public bool NeedsWrittenPages => !_image.SequenceEqual(_written);

    public double HoleShare => _image[(int)PageContent.Zero];

    public void Classify(PageBitmap pages, long count, bool initialImage, RoundContent into, PageBitmap? written = null)
    {
        into.Clear();
        long rewritten = initialImage ? WrittenPages.Among(pages, written) : count;
        for (int c = 0; c < RoundContent.Classes; c++)
        {
            into.Pages[c] = (count - rewritten) * _image[c] + rewritten * _written[c];
            if (c != (int)PageContent.Zero) into.BytesChanged[c] = into.Pages[c] * BytesChangedPerPage;
        }
    }
}

/// <summary>
/// The hotcold workload's writes: page ranks drawn by the workload's own inverse CDF of a
/// continuous Zipf density over [1, n + 1) (rank k has probability F(k + 2) − F(k + 1)). Ranks
/// are grouped into buckets over which the probability changes by at most 5% (the first ranks
/// alone), and within a bucket the writes fall uniformly (Poisson per page, as
/// <see cref="DirtyModel"/>). Rank k is page k: where the workload's permutation puts a rank
/// changes no model (the policies see only which pages are re-dirtied).
/// </summary>
public sealed class ZipfDirtyModel : IDirtyProcess
{
    private readonly (long First, long Size, double Share)[] _buckets;
    private readonly PageScatter _scatter;

    public ZipfDirtyModel(long pageCount, long workingSet, double skew, double rate, ulong seed)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(workingSet, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(workingSet, pageCount);
        if (!(rate >= 0) || double.IsInfinity(rate)) throw new ArgumentOutOfRangeException(nameof(rate), rate, "must be a finite number of page writes/s ≥ 0");
        PageCount = pageCount;
        Rate = rate;
        _scatter = new PageScatter(seed);
        double n1 = workingSet + 1.0, oneMinusS = 1 - skew;
        bool logLaw = Math.Abs(oneMinusS) < 1e-9;
        double denominator = logLaw ? Math.Log(n1) : Math.Pow(n1, oneMinusS) - 1;
        double F(double x) => Math.Clamp(logLaw ? Math.Log(x) / denominator : (Math.Pow(x, oneMinusS) - 1) / denominator, 0, 1);
        var buckets = new List<(long, long, double)>();
        for (long k = 0; k < workingSet;)
        {
            long size = Math.Min(workingSet - k, Math.Max(1, (long)(k * 0.05 / Math.Max(skew, 0.01))));
            buckets.Add((k, size, F(k + size + 1) - F(k + 1)));
            k += size;
        }
        _buckets = [.. buckets];
    }

    public long PageCount { get; }
    public double Rate { get; }

    public void Populated(PageBitmap into) => into.SetRange(0, PageCount);
    public double RateAt(double t) => Rate;
    public double WritesUpTo(double t) => Math.Max(0, t) * Rate;

    public long Write(double from, double to, PageBitmap? into)
    {
        if (into is null || !(to > from)) return 0;
        double writes = Rate * (to - from);
        long newly = 0;
        foreach (var (first, size, share) in _buckets) newly += _scatter.Scatter(into, first, size, writes * share);
        return newly;
    }
}

/// <summary>
/// The sweep workload's writes: each vCPU walks its slice of the range page after page at its
/// share of the rate, wrapping at the end (the workload's slices: range ÷ vCPUs, the last one
/// takes the remainder). Deterministic: the pages written in a span of work are exactly those
/// the positions passed.
/// </summary>
public sealed class SweepDirtyProcess : IDirtyProcess
{
    private readonly (long First, long Count)[] _slices;
    private readonly double _perVcpu;

    public SweepDirtyProcess(long pageCount, long range, int vcpus, double rate)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(range, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(range, pageCount);
        ArgumentOutOfRangeException.ThrowIfLessThan(vcpus, 1);
        PageCount = pageCount;
        Rate = rate;
        _perVcpu = rate / vcpus;
        long per = range / vcpus;
        _slices = Enumerable.Range(0, vcpus).Select(v => (per * v, v == vcpus - 1 ? range - per * v : per)).ToArray();
    }

    public long PageCount { get; }
    public double Rate { get; }

    public void Populated(PageBitmap into) => into.SetRange(0, PageCount);
    public double RateAt(double t) => Rate;
    public double WritesUpTo(double t) => Math.Floor(Math.Max(0, t) * _perVcpu) * _slices.Length;

    public long Write(double from, double to, PageBitmap? into)
    {
        if (into is null || !(to > from)) return 0;
        long newly = 0;
        foreach (var (first, count) in _slices)
        {
            if (count == 0) continue;
            long a = (long)Math.Floor(from * _perVcpu), b = (long)Math.Floor(to * _perVcpu); // positions passed: [a, b)
            if (b - a >= count) { newly += PageScatter.SetAll(into, first, count); continue; }
            long start = a % count, n = b - a;
            if (n == 0) continue;
            long head = Math.Min(n, count - start);
            newly += PageScatter.SetAll(into, first + start, head);
            if (n > head) newly += PageScatter.SetAll(into, first, n - head);
        }
        return newly;
    }
}
