using System.Numerics;
using System.Runtime.Intrinsics;
using LiveMig.Memory;
using LiveMig.Workloads;

namespace LiveMig.Simulation;

/// <summary>
/// What a modelled guest writes, as a function of its own progress: the seconds of work it has
/// done (its progress clock runs slower than virtual time while it is throttled or dirty-limited,
/// <see cref="SimGuest"/>). Per page: it sets the pages written, so a page written twice between
/// two harvests counts once and the controller sees which pages are re-dirtied round after round
/// (SimGrid's model counts bytes × intensity instead).
/// </summary>
public interface IDirtyProcess
{
    /// <summary>Pages the process uses (its page numbers are below this).</summary>
    long PageCount { get; }

    /// <summary>Sets the pages present at the start (round 0's pages: holes are not sent).</summary>
    void Populated(PageBitmap into);

    /// <summary>
    /// Sets in <paramref name="into"/> the pages written by the work between progress times
    /// <paramref name="from"/> and <paramref name="to"/> (seconds, from ≤ to, called with
    /// consecutive spans); returns how many it newly set there (the distinct pages written, when
    /// <paramref name="into"/> starts empty). A null <paramref name="into"/>: the work is done
    /// (content changes) but nobody tracks it — before the migration's dirty log started.
    /// </summary>
    long Write(double from, double to, PageBitmap? into);

    /// <summary>Page writes done by the work up to progress time <paramref name="t"/> (the guest's progress counter).</summary>
    double WritesUpTo(double t);

    /// <summary>Page writes per second at progress time <paramref name="t"/> (what a dirty limit is compared with).</summary>
    double RateAt(double t);
}

/// <summary>One phase of a hand-given dirty model, in force from <see cref="At"/> (progress seconds) until the next.</summary>
/// <param name="Rate">Page writes per second, all vCPUs together.</param>
/// <param name="WorkingSet">Pages the writes fall on (the writable working set): pages [0, WorkingSet).</param>
/// <param name="HotShare">Fraction of the working set that is hot (its first pages); 0 for uniform writes.</param>
/// <param name="HotWrites">Fraction of the writes that fall on the hot pages.</param>
public sealed record DirtyPhase(double At, double Rate, long WorkingSet, double HotShare = 0, double HotWrites = 0)
{
    internal void Check(long pageCount)
    {
        if (!(At >= 0)) throw new ArgumentOutOfRangeException(nameof(At), At, "a phase starts at a time ≥ 0");
        if (!(Rate >= 0) || double.IsInfinity(Rate)) throw new ArgumentOutOfRangeException(nameof(Rate), Rate, "must be a finite number of page writes/s ≥ 0");
        if (WorkingSet < 1 || WorkingSet > pageCount) throw new ArgumentOutOfRangeException(nameof(WorkingSet), WorkingSet, $"must be 1..{pageCount} pages (the memory)");
        if (!(HotShare >= 0 && HotShare <= 1)) throw new ArgumentOutOfRangeException(nameof(HotShare), HotShare, "must be 0..1");
        if (!(HotWrites >= 0 && HotWrites <= 1)) throw new ArgumentOutOfRangeException(nameof(HotWrites), HotWrites, "must be 0..1");
    }
}

/// <summary>
/// A dirty model given by hand: phases of (rate, writable working set, hot set and its share of
/// the writes). Within a phase the writes fall uniformly on the hot pages and on the rest of the
/// working set, each with its share: w writes on s pages leave each page written with
/// probability 1 − e^(−w/s) (Poisson), drawn from a seeded generator (a Poisson number of uniform
/// writes when few pages are written, by 64-page words when many), so a run is deterministic for a seed.
/// Every page of memory is present from the start.
/// </summary>
public sealed class DirtyModel : IDirtyProcess
{
    private readonly DirtyPhase[] _phases;
    private readonly double[] _writesBefore; // page writes done before each phase starts
    private readonly PageScatter _scatter;

    public DirtyModel(long pageCount, IReadOnlyList<DirtyPhase> phases, ulong seed)
    {
        if (pageCount < 1) throw new ArgumentOutOfRangeException(nameof(pageCount), pageCount, "must be at least one page");
        if (phases.Count == 0 || phases[0].At != 0) throw new ArgumentException("the first phase starts at 0", nameof(phases));
        for (int i = 0; i < phases.Count; i++)
        {
            phases[i].Check(pageCount);
            if (i > 0 && !(phases[i].At > phases[i - 1].At)) throw new ArgumentException($"phase {i} starts at {phases[i].At} s, not after the one before", nameof(phases));
        }
        PageCount = pageCount;
        _phases = [.. phases];
        _writesBefore = new double[_phases.Length];
        for (int i = 1; i < _phases.Length; i++) _writesBefore[i] = _writesBefore[i - 1] + _phases[i - 1].Rate * (_phases[i].At - _phases[i - 1].At);
        _scatter = new PageScatter(seed);
    }

    /// <summary>A constant rate over a working set, uniform (the simplest model: SimGrid's, per page).</summary>
    public static DirtyModel Constant(long pageCount, double rate, long? workingSet = null, ulong seed = 1) =>
        new(pageCount, [new DirtyPhase(0, rate, workingSet ?? pageCount)], seed);

    public long PageCount { get; }
    public IReadOnlyList<DirtyPhase> Phases => _phases;

    public void Populated(PageBitmap into) => into.SetRange(0, PageCount);

    private int PhaseAt(double t)
    {
        int i = _phases.Length - 1;
        while (i > 0 && _phases[i].At > t) i--;
        return i;
    }

    public double RateAt(double t) => _phases[PhaseAt(t)].Rate;

    public double WritesUpTo(double t)
    {
        if (t <= 0) return 0;
        int i = PhaseAt(t);
        return _writesBefore[i] + _phases[i].Rate * (t - _phases[i].At);
    }

    public long Write(double from, double to, PageBitmap? into)
    {
        if (into is null) return 0; // nothing to track: the model keeps no content of its own
        long newly = 0;
        for (int i = PhaseAt(from); i < _phases.Length && from < to; i++)
        {
            var p = _phases[i];
            double end = i + 1 < _phases.Length ? Math.Min(to, _phases[i + 1].At) : to;
            if (end <= from) continue;
            double writes = p.Rate * (end - from);
            long hot = p.HotShare > 0 ? Math.Clamp((long)Math.Round(p.WorkingSet * p.HotShare), 1, p.WorkingSet) : 0;
            double hotWrites = hot > 0 ? writes * p.HotWrites : 0;
            newly += _scatter.Scatter(into, 0, hot, hotWrites);
            newly += _scatter.Scatter(into, hot, p.WorkingSet - hot, writes - hotWrites);
            from = end;
        }
        return newly;
    }

    internal static long CountRange(PageBitmap b, long first, long size)
    {
        ulong[] words = b.Words;
        long n = 0, end = first + size, p = first;
        while (p < end && (p & 63) != 0) { if ((words[p >> 6] & (1UL << (int)(p & 63))) != 0) n++; p++; }
        for (; p + 64 <= end; p += 64) n += BitOperations.PopCount(words[p >> 6]);
        for (; p < end; p++) if ((words[p >> 6] & (1UL << (int)(p & 63))) != 0) n++;
        return n;
    }
}

/// <summary>
/// What a guest reads (the hand model's <c>reads</c>): <see cref="Rate"/> page reads per second of
/// its work, all vCPUs together, uniform over pages [0, <see cref="WorkingSet"/>). A read costs
/// nothing while the VM runs at its source (pre-copy does not see it); after a switch to
/// post-copy a read of a page not yet at the destination is a demand fault, as a write is.
/// </summary>
public sealed record ReadModel(double Rate, long WorkingSet)
{
    /// <summary>Sets in <paramref name="into"/> the pages read by the work between progress times <paramref name="from"/> and <paramref name="to"/> (each with probability 1 − e^(−reads/set)).</summary>
    internal long Read(PageScatter scatter, double from, double to, PageBitmap into) =>
        to > from && Rate > 0 ? scatter.Scatter(into, 0, WorkingSet, Rate * (to - from)) : 0;
}

/// <summary>Seeded per-page draws of which pages some writes hit: the dirty models' one random source.</summary>
internal sealed class PageScatter(ulong seed)
{
    /// <summary>From this share of pages written on, whole 64-page words are drawn (eight at a time: cheaper than a draw a write from about here); below it, the writes one by one.</summary>
    private const double DenseFrom = 1.0 / 64;
    private Xoshiro256 _rng = new(seed);

    /// <summary>
    /// Marks each page of [first, first + size) with probability q = 1 − e^(−writes/size),
    /// independently; returns the pages newly set. Sparse (q under 1/64): a Poisson number of
    /// writes, mean <paramref name="writes"/>, each on a uniform page — which leaves every page
    /// written with exactly that probability, independently (Poissonisation), at one draw per
    /// write. Dense: by whole 64-page words, each bit a Bernoulli draw built from random words
    /// (about 9 a word), so a round that dirties most of a large working set costs a pass over
    /// its words, not a draw per page.
    /// </summary>
    public long Scatter(PageBitmap into, long first, long size, double writes)
    {
        if (size <= 0 || !(writes > 0)) return 0;
        double q = -double.ExpM1(-writes / size);
        if (q >= 1 - 1e-12) return SetAll(into, first, size);
        return q < DenseFrom ? ScatterWrites(into, first, size, writes) : ScatterDense(into, first, size, q);
    }

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)] // a hot loop: straight to optimised code, no tier-0 pass
    private long ScatterWrites(PageBitmap into, long first, long size, double writes)
    {
        long n = Poisson(ref _rng, writes), newly = 0;
        ulong stream = _rng.Next(); // a SplitMix64 stream for the pages: its draws do not wait on each other
        ulong[] words = into.Words;
        for (long i = 0; i < n; i++)
        {
            long page = first + (long)Math.BigMul(Xoshiro256.SplitMix(ref stream), (ulong)size, out _);
            ulong bit = 1UL << (int)(page & 63);
            ref ulong w = ref words[page >> 6];
            if ((w & bit) == 0)
            {
                w |= bit;
                newly++;
            }
        }
        return newly;
    }

    /// <summary>
    /// Each bit of a word with probability q: q = m/256 × 2^−e with m in [128, 256] drawn per word
    /// as ⌊m⌋ or ⌈m⌉ (dithered by 16 random bits, so the mean is q to 1/2^23 of it); m/256 from
    /// its bits, least significant up — OR with a random word for a 1, AND for a 0 — then e ANDs
    /// halving it. Eight words at a time on eight SplitMix64 streams in one 512-bit vector (the
    /// draws were 60% of a dirtying run word by word); the range's partial words and the last
    /// few one by one. Vector512 gives the same bits where it is not accelerated, only slower.
    /// </summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)] // a hot loop: straight to optimised code, no tier-0 pass
    private long ScatterDense(PageBitmap into, long first, long size, double q)
    {
        int e = 0;
        double m = q * 256;
        while (m < 128) { m *= 2; e++; }
        int whole = (int)m;
        uint frac = (uint)((m - whole) * 65536);
        ulong stream = _rng.Next(); // a SplitMix64 stream for the words: its draws do not wait on each other, as xoshiro's do
        ulong[] words = into.Words;
        long newly = 0, end = first + size;
        long w = first >> 6, last = (end - 1) >> 6;
        long bodyFrom = (first + 63) >> 6, bodyTo = end >> 6; // the words wholly inside the range: [bodyFrom, bodyTo)
        for (; w < bodyFrom && w <= last; w++) newly += OrWord(words, w, DenseWord(ref stream, whole, frac, e) & InRange(w, first, end));
        if (bodyTo - w >= 8) w = DenseBody(words, w, bodyTo, whole, frac, e, ref newly);
        for (; w <= last; w++) newly += OrWord(words, w, DenseWord(ref stream, whole, frac, e) & InRange(w, first, end));
        return newly;
    }

    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveInlining)]
    private static long OrWord(ulong[] words, long w, ulong mask)
    {
        long n = BitOperations.PopCount(mask & ~words[w]);
        words[w] |= mask;
        return n;
    }

    /// <summary>The bits of word <paramref name="w"/> that lie in pages [first, end).</summary>
    private static ulong InRange(long w, long first, long end)
    {
        long lo = Math.Max(first, w << 6) - (w << 6), hi = Math.Min(end, (w + 1) << 6) - (w << 6);
        return (hi >= 64 ? ~0UL : (1UL << (int)hi) - 1) & ~((1UL << (int)lo) - 1);
    }

    /// <summary>One word of Bernoulli(q) bits, q = m/256 × 2^−e, m dithered between whole and whole + 1.</summary>
    private static ulong DenseWord(ref ulong stream, int whole, uint frac, int e)
    {
        int mw = whole + ((uint)(Xoshiro256.SplitMix(ref stream) & 0xFFFF) < frac ? 1 : 0);
        ulong mask;
        if (mw >= 256) mask = ~0UL;
        else
        {
            mask = 0;
            for (int i = BitOperations.TrailingZeroCount(mw); i < 8; i++)
                mask = ((mw >> i) & 1) != 0 ? mask | Xoshiro256.SplitMix(ref stream) : mask & Xoshiro256.SplitMix(ref stream);
        }
        for (int i = 0; i < e; i++) mask &= Xoshiro256.SplitMix(ref stream);
        return mask;
    }

    /// <summary>Words [from, to) eight at a time (as <see cref="DenseWord"/>, one lane a word); returns where it stopped.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveOptimization)]
    private long DenseBody(ulong[] words, long from, long to, int whole, uint frac, int e, ref long newly)
    {
        var state = Vector512.Create(_rng.Next(), _rng.Next(), _rng.Next(), _rng.Next(), _rng.Next(), _rng.Next(), _rng.Next(), _rng.Next());
        var lo = Vector512.Create((ulong)whole);
        var hi = Vector512.Create((ulong)(whole + 1));
        var fracV = Vector512.Create((ulong)frac);
        var low16 = Vector512.Create(0xFFFFUL);
        var one = Vector512<ulong>.One;
        int from0 = whole + 1 >= 256 ? BitOperations.TrailingZeroCount(whole) : Math.Min(BitOperations.TrailingZeroCount(whole), BitOperations.TrailingZeroCount(whole + 1));
        long w = from;
        var dither = Vector512<ulong>.Zero;
        var counted = Vector512<ulong>.Zero; // the pages newly set, per lane
        for (int round = 0; w + 8 <= to; w += 8, round++)
        {
            if ((round & 3) == 0) dither = Next(ref state); // 16 bits a lane a word: one draw dithers four rounds of lanes
            var up = Vector512.LessThan(dither & low16, fracV); // the lanes whose m rounds up
            dither = Vector512.ShiftRightLogical(dither, 16);
            var mw = Vector512.ConditionalSelect(up, hi, lo);
            var mask = Vector512<ulong>.Zero;
            for (int i = from0; i < 8; i++)
            {
                var r = Next(ref state);
                var bit = Vector512.Equals(Vector512.ShiftRightLogical(mw, i) & one, one);
                mask = Vector512.ConditionalSelect(bit, mask | r, mask & r);
            }
            mask = Vector512.ConditionalSelect(Vector512.GreaterThanOrEqual(mw, Vector512.Create(256UL)), Vector512<ulong>.AllBitsSet, mask);
            for (int i = 0; i < e; i++) mask &= Next(ref state);
            ref ulong at = ref words[w];
            var old = Vector512.LoadUnsafe(ref at);
            (old | mask).StoreUnsafe(ref at);
            var fresh = mask & ~old;
            if (System.Runtime.Intrinsics.X86.Avx512BW.IsSupported) counted += PageBitmap.PopCount8(fresh);
            else for (int k = 0; k < 8; k++) newly += BitOperations.PopCount(fresh.GetElement(k));
        }
        newly += (long)Vector512.Sum(counted);
        return w;
    }

    /// <summary>SplitMix64 on eight lanes: each lane its own stream.</summary>
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.AggressiveInlining)]
    private static Vector512<ulong> Next(ref Vector512<ulong> state)
    {
        state += Vector512.Create(0x9E3779B97F4A7C15UL);
        var z = state;
        z = (z ^ Vector512.ShiftRightLogical(z, 30)) * Vector512.Create(0xBF58476D1CE4E5B9UL);
        z = (z ^ Vector512.ShiftRightLogical(z, 27)) * Vector512.Create(0x94D049BB133111EBUL);
        return z ^ Vector512.ShiftRightLogical(z, 31);
    }

    /// <summary>A Poisson draw of mean <paramref name="mean"/>: by products of uniforms below 30, by Hörmann's transformed rejection (PTRS, 1993) above.</summary>
    internal static long Poisson(ref Xoshiro256 rng, double mean)
    {
        if (mean < 30)
        {
            double limit = Math.Exp(-mean), p = 1;
            long k = -1;
            do { k++; p *= rng.NextDouble(); } while (p > limit);
            return k;
        }
        double slam = Math.Sqrt(mean), loglam = Math.Log(mean);
        double b = 0.931 + 2.53 * slam, a = -0.059 + 0.02483 * b, invalpha = 1.1239 + 1.1328 / (b - 3.4), vr = 0.9277 - 3.6224 / (b - 2);
        while (true)
        {
            double u = rng.NextDouble() - 0.5, v = rng.NextDouble(), us = 0.5 - Math.Abs(u);
            double k = Math.Floor((2 * a / us + b) * u + mean + 0.43);
            if (us >= 0.07 && v <= vr) return (long)k;
            if (k < 0 || us < 0.013 && v > us) continue;
            if (Math.Log(v) + Math.Log(invalpha) - Math.Log(a / (us * us) + b) <= -mean + k * loglam - LogFactorial(k)) return (long)k;
        }
    }

    /// <summary>ln k! (exact below 10, Stirling's series above: error under 1e-10).</summary>
    private static double LogFactorial(double k)
    {
        if (k < 10)
        {
            double f = 1;
            for (int i = 2; i <= (int)k; i++) f *= i;
            return Math.Log(f);
        }
        double x = k + 1, inv = 1 / x, inv2 = inv * inv;
        return (x - 0.5) * Math.Log(x) - x + 0.9189385332046727 + inv * (1.0 / 12 - inv2 * (1.0 / 360 - inv2 / 1260));
    }

    internal static long SetAll(PageBitmap into, long first, long size)
    {
        long before = DirtyModel.CountRange(into, first, size);
        into.SetRange(first, size);
        return size - before;
    }
}
