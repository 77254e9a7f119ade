using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// A Zipf-skewed writable working set: most writes fall on a few hot pages, the rest on a long
/// cold tail, as in the writable-working-set measurements of Clark et al. Ranks are scattered
/// over the working set by a fixed permutation, so hot pages are not adjacent.
/// Parameters: <c>wss</c> (working-set size or %, default 10%), <c>skew</c> (Zipf exponent, default 0.99),
/// <c>rate</c> (page writes/s, default 50000).
/// </summary>
public sealed class HotColdWorkload : Workload
{
    private readonly long _wss;
    private readonly double _skew;
    private readonly double _rate;

    public HotColdWorkload(WorkloadSpec spec, long memoryPages) : base(spec)
    {
        spec.CheckKnown("wss", "skew", "rate");
        _wss = spec.Pages("wss", Math.Max(1, memoryPages / 10), memoryPages);
        _skew = spec.Double("skew", 0.99, 0.01, 5);
        _rate = spec.Double("rate", 50000, 0, 1e12);
    }

    /// <summary>Pages outside the working set are never touched: reported free.</summary>
    public override long FreePages(PageBitmap into) => FreeAbove(into, _wss);

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed)
    {
        long n = _wss;
        double oneMinusS = 1 - _skew;
        double nPow = Math.Pow(n + 1, oneMinusS);
        // A multiplier coprime with n scatters ranks over the working set.
        long mult = 2654435761L % Math.Max(n, 1);
        while (n > 1 && (mult == 0 || Gcd(mult, n) != 1)) mult++;
        return new PageWriterProgram(seed, _rate / vcpuCount, (ref Xoshiro256 rng) =>
        {
            // Inverse CDF of the continuous Zipf density on [1, n+1): close to discrete Zipf, O(1).
            double u = rng.NextDouble();
            double x = Math.Abs(oneMinusS) < 1e-9 ? Math.Exp(u * Math.Log(n + 1)) : Math.Pow(u * (nPow - 1) + 1, 1 / oneMinusS);
            long rank = Math.Clamp((long)x - 1, 0, n - 1);
            return (long)((UInt128)(ulong)rank * (ulong)mult % (ulong)n);
        }, Time);
    }

    private static long Gcd(long a, long b) { while (b != 0) (a, b) = (b, a % b); return a; }
}
