using System.Text.Json;
using System.Text.Json.Serialization;
using LiveMig.Core;
using LiveMig.Memory;
using LiveMig.Policies;
using LiveMig.Traces;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Simulation;

/// <summary>Distinct pages written in spans of one length, over an observation window.</summary>
/// <param name="SpanS">The span's length, seconds.</param>
/// <param name="MeanPages">Mean distinct pages written per span of that length.</param>
public sealed record DirtyCurvePoint(double SpanS, double MeanPages);

/// <summary>
/// What <see cref="VmObserver"/> saw of a running VM: its size, its dirtying — distinct pages
/// written per span for spans of 1, 2, 4 … observation intervals (the curve pre-copy's rounds
/// follow: a round of length t re-sends the pages written in t), the pages written at all in the
/// window (the writable working set it showed) — and its content at the window's end: the shares
/// of each content class among a sample of its present pages and among a sample of the pages it wrote.
/// </summary>
public sealed record VmObservation
{
    public required long PageCount { get; init; }
    public int Vcpus { get; init; } = 1;
    public long PresentPages { get; init; }
    public double WindowS { get; init; }
    public double IntervalS { get; init; }
    /// <summary>Distinct pages written per interval, in order.</summary>
    public IReadOnlyList<long> PerInterval { get; init; } = [];
    public IReadOnlyList<DirtyCurvePoint> Curve { get; init; } = [];
    /// <summary>Pages written at least once in the window.</summary>
    public long WorkingSetPages { get; init; }
    /// <summary>Shares per <see cref="PageContent"/> class: the present pages' (the image round 0 sends) and the written pages'.</summary>
    public IReadOnlyList<double> ImageShares { get; init; } = [];
    public IReadOnlyList<double> WrittenShares { get; init; } = [];
    /// <summary>Mean bytes a written page differed by from its first sample (XBZRLE's delta).</summary>
    public double BytesChangedPerPage { get; init; } = PageClasses.PageSize;
    /// <summary>The VM state's size (bytes), as the VM hints it.</summary>
    public long StateBytes { get; init; }
}

/// <summary>
/// Observes a running VM for a short window before anything is sent: its own dirty log (started
/// and stopped again, so the migration that may follow starts it afresh), harvested every
/// interval; a content sample of its present pages at the start and of the pages it wrote at the
/// end (<see cref="PageClassifier"/>, the trace recorder's classes). Bounded: one bitmap per
/// doubling of the span, a fixed number of sampled pages.
/// </summary>
public static class VmObserver
{
    public static VmObservation Observe(IVirtualMachine vm, TimeSpan window, TimeSpan interval, int samplePages = 1024, ulong seed = 1, TimeProvider? time = null, CancellationToken cancel = default)
    {
        time ??= TimeProvider.System;
        if (interval <= TimeSpan.Zero || window < interval) throw new ArgumentException($"the window ({window.TotalMilliseconds:0} ms) must hold at least one interval ({interval.TotalMilliseconds:0} ms)");
        int intervals = (int)Math.Min(4096, Math.Floor(window / interval));
        var log = vm.DirtyLog;
        if (log.IsTracking) throw new InvalidOperationException($"VM {vm.Name}'s dirty log is in use (a migration is running): it cannot be observed now");
        long pages = vm.Memory.PageCount;
        var present = new PageBitmap(pages);
        long presentCount = vm.Memory.MarkPopulated(present);
        var rng = new Xoshiro256(seed);
        // The first sample's copies are what the bytes a written page changed by are measured against.
        var image = SampleShares(vm.Memory, present, presentCount, samplePages, ref rng, null, out var firstCopies);
        var levels = new List<(PageBitmap? Open, double Sum, int Spans)>();
        var perInterval = new List<long>(intervals);
        var everWritten = new PageBitmap(pages);
        var scratch = new PageBitmap(pages);
        log.Start();
        try
        {
            long last = time.GetTimestamp();
            for (int i = 0; i < intervals; i++)
            {
                time.Sleep(interval, cancel);
                scratch.ClearAll();
                long n = log.Harvest(scratch);
                perInterval.Add(n);
                everWritten.Or(scratch);
                Accumulate(levels, scratch, n, i, intervals);
            }
            window = time.GetElapsedTime(last);
        }
        finally { log.Stop(); }
        long written = everWritten.Count();
        var writtenShares = SampleShares(vm.Memory, everWritten, written, samplePages, ref rng, firstCopies, out _, out double changed);
        // What a migration starting now finds: the pages present now (the window's writes filled some holes), their content now.
        present.ClearAll();
        presentCount = vm.Memory.MarkPopulated(present);
        image = SampleShares(vm.Memory, present, presentCount, samplePages, ref rng, null, out _);
        var curve = levels.Select((l, k) => new DirtyCurvePoint(interval.TotalSeconds * (1 << k), l.Spans > 0 ? l.Sum / l.Spans : 0)).Where((p, k) => levels[k].Spans > 0).ToList();
        return new VmObservation
        {
            PageCount = pages, Vcpus = vm.VcpuCount, PresentPages = presentCount, WindowS = window.TotalSeconds, IntervalS = interval.TotalSeconds,
            PerInterval = perInterval, Curve = curve, WorkingSetPages = written, ImageShares = image,
            WrittenShares = written > 0 ? writtenShares : image, BytesChangedPerPage = written > 0 ? changed : PageClasses.PageSize,
            StateBytes = vm.StateSizeHint,
        };
    }

    /// <summary>Spans of 2^k intervals, aligned: level 0 counts each interval; level k ≥ 1 ORs the intervals into its open span and counts it when the span is full (levels up to the window's length only).</summary>
    private static void Accumulate(List<(PageBitmap? Open, double Sum, int Spans)> levels, PageBitmap interval, long count, int index, int intervals)
    {
        if (levels.Count == 0) levels.Add((null, 0, 0));
        levels[0] = (null, levels[0].Sum + count, levels[0].Spans + 1);
        for (int k = 1; k < 12 && (1 << k) <= intervals; k++)
        {
            if (levels.Count <= k) levels.Add((new PageBitmap(interval.PageCount), 0, 0));
            var (open, sum, spans) = levels[k];
            open!.Or(interval);
            if ((index + 1) % (1 << k) != 0) continue;
            levels[k] = (open, sum + open.Count(), spans + 1);
            open.ClearAll();
        }
    }

    private static double[] SampleShares(GuestMemory memory, PageBitmap among, long count, int samples, ref Xoshiro256 rng, Dictionary<long, byte[]>? before, out Dictionary<long, byte[]> copies) =>
        SampleShares(memory, among, count, samples, ref rng, before, out copies, out _);

    /// <summary>Classifies up to <paramref name="samples"/> pages drawn from <paramref name="among"/> (uniformly, by rank); with <paramref name="before"/>, also the bytes each differs by from its earlier copy.</summary>
    private static double[] SampleShares(GuestMemory memory, PageBitmap among, long count, int samples, ref Xoshiro256 rng, Dictionary<long, byte[]>? before, out Dictionary<long, byte[]> copies, out double changed)
    {
        var shares = new double[RoundContent.Classes];
        copies = [];
        changed = 0;
        if (count == 0) { shares[(int)PageContent.Zero] = 1; return shares; }
        var ranks = new SortedSet<long>();
        int n = (int)Math.Min(samples, count);
        while (ranks.Count < n) ranks.Add(rng.NextBelow(count));
        var page = new byte[GuestMemory.PageSize];
        long rank = 0;
        int compared = 0;
        using var it = ranks.GetEnumerator();
        bool more = it.MoveNext();
        for (long p = 0; p < among.PageCount && more; p++)
        {
            if (!among.IsSet(p)) continue;
            if (rank++ != it.Current) continue;
            more = it.MoveNext();
            if (!memory.TryCopyPage(p, page)) Array.Clear(page);
            shares[(int)PageClassifier.Classify(page)]++;
            copies[p] = (byte[])page.Clone();
            if (before is not null && before.TryGetValue(p, out var old))
            {
                changed += PageClassifier.BytesChanged(old, page);
                compared++;
            }
        }
        for (int c = 0; c < shares.Length; c++) shares[c] /= n;
        changed = compared > 0 ? Math.Max(1, changed / compared) : PageClasses.PageSize;
        return shares;
    }
}

/// <summary>
/// Fits the hand dirty model (<see cref="DirtyPhase"/>: rate, working set, hot set and its share
/// of the writes) to an observation's curve of distinct pages per span: for each hot split on a
/// grid it finds the working set and rate that give the curve's first point and the window's
/// working set, and keeps the split whose whole curve is nearest (relative squared error).
/// Uniform writes (no hot set) are one of the candidates.
/// </summary>
public static class DirtyFit
{
    private static readonly double[] HotShares = [0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5];
    private static readonly double[] HotWrites = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99];

    public static DirtyPhase Fit(VmObservation o)
    {
        if (o.Curve.Count == 0 || o.Curve[0].MeanPages <= 0) return new DirtyPhase(0, 0, o.PageCount); // idle
        DirtyPhase? best = null;
        double bestError = double.PositiveInfinity;
        foreach (double h in HotShares)
            foreach (double f in h == 0 ? [0.0] : HotWrites)
            {
                var phase = FitRateAndSet(o, h, f);
                double e = Error(o, phase);
                if (e < bestError) (best, bestError) = (phase, e);
            }
        return best!;
    }

    /// <summary>Expected distinct pages the model writes in t seconds.</summary>
    public static double Distinct(DirtyPhase p, double t)
    {
        long hot = p.HotShare > 0 ? Math.Clamp((long)Math.Round(p.WorkingSet * p.HotShare), 1, p.WorkingSet) : 0;
        double w = p.Rate * t, hw = hot > 0 ? w * p.HotWrites : 0;
        double d = hot > 0 ? hot * -double.ExpM1(-hw / hot) : 0;
        long cold = p.WorkingSet - hot;
        return d + (cold > 0 ? cold * -double.ExpM1(-(w - hw) / cold) : 0);
    }

    private static double Error(VmObservation o, DirtyPhase p)
    {
        double e = 0;
        foreach (var c in o.Curve) e += Sq(Distinct(p, c.SpanS) / c.MeanPages - 1);
        if (o.WorkingSetPages > 0) e += Sq(Distinct(p, o.WindowS) / o.WorkingSetPages - 1);
        return e;
    }

    private static double Sq(double x) => x * x;

    /// <summary>For a hot split: the working set (log-spaced search from the window's working set up to memory) and, for each, the rate that gives the curve's first point.</summary>
    private static DirtyPhase FitRateAndSet(VmObservation o, double h, double f)
    {
        var first = o.Curve[0];
        long lo = Math.Max(1, o.WorkingSetPages), hi = o.PageCount;
        DirtyPhase? best = null;
        double bestError = double.PositiveInfinity;
        const int Steps = 48;
        for (int i = 0; i <= Steps; i++)
        {
            long set = (long)Math.Round(lo * Math.Pow((double)hi / lo, (double)i / Steps));
            set = Math.Clamp(set, 1, o.PageCount);
            if (first.MeanPages >= set) continue;
            var p = new DirtyPhase(0, RateFor(new DirtyPhase(0, 1, set, h, f), first.SpanS, first.MeanPages), set, h, f);
            double e = Error(o, p);
            if (e < bestError) (best, bestError) = (p, e);
        }
        return best ?? new DirtyPhase(0, first.MeanPages / first.SpanS, o.PageCount, h, f);
    }

    /// <summary>The rate at which the model writes <paramref name="pages"/> distinct pages in <paramref name="t"/> seconds (bisection: distinct pages grow with the rate).</summary>
    private static double RateFor(DirtyPhase shape, double t, double pages)
    {
        double lo = 0, hi = pages / t;
        while (Distinct(shape with { Rate = hi }, t) < pages && hi < 1e13) hi *= 2;
        for (int i = 0; i < 80; i++)
        {
            double mid = (lo + hi) / 2;
            if (Distinct(shape with { Rate = mid }, t) < pages) lo = mid; else hi = mid;
        }
        return (lo + hi) / 2;
    }
}

/// <summary>A link to predict over: its rate, its round trip, and the migration's cap (0: none).</summary>
public sealed record PredictionLink(double BytesPerSecond, TimeSpan RoundTrip, double CapBytesPerSecond = 0);

/// <summary>One strategy to predict: a name and the simulator's options for it.</summary>
public sealed record PredictionCase(string Name, SimMigrationOptions Options);

/// <summary>What the simulator predicts for one strategy.</summary>
public sealed record StrategyPrediction(string Strategy, string Outcome, double TotalMs, double DowntimeMs, long BytesOnWire, int Rounds, string StopReason, string? Note = null);

/// <summary>The predictions for a VM and what they were made from.</summary>
public sealed record Prediction
{
    public required VmObservation Observation { get; init; }
    public required DirtyPhase Fitted { get; init; }
    public required PredictionLink Link { get; init; }
    public required IReadOnlyList<StrategyPrediction> Strategies { get; init; }

    public string ToJson() => JsonSerializer.Serialize(this, PredictionJson.Default.Prediction);
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(Prediction))]
internal partial class PredictionJson : JsonSerializerContext;

/// <summary>
/// Predicts a migration's total time, downtime and bytes for each strategy before anything is
/// sent (issue 15; Akoush et al., MASCOTS 2010): the VM as observed (<see cref="VmObserver"/>),
/// its dirtying fitted (<see cref="DirtyFit"/>), its content as sampled, run through the
/// simulator — the engine's own <see cref="RoundController"/> and <see cref="PreCopyPolicy"/> on a
/// virtual clock. The call the engine makes (automatic technique choice, moving target defense,
/// fleet planning): <see cref="Predict(IVirtualMachine, PredictionLink, TimeSpan?, IReadOnlyList{PredictionCase}?)"/>.
/// </summary>
public static class MigrationPredictor
{
    /// <summary>The strategies predicted when none are given: pre-copy with the engine's defaults, with auto-converge on a stall, with LZ4, with the adaptive codec choice; post-copy; hybrid with the engine's default budget.</summary>
    public static IReadOnlyList<PredictionCase> DefaultCases(PreCopyOptions? precopy = null)
    {
        var o = precopy ?? new PreCopyOptions();
        return
        [
            new("precopy", new SimMigrationOptions { PreCopy = o }),
            new("precopy, on-stall throttle", new SimMigrationOptions { PreCopy = o with { OnStall = StallAction.Throttle } }),
            new("precopy, lz4", new SimMigrationOptions { PreCopy = o, Pipeline = new SimPipeline(SimCompression.Lz4) }),
            new("precopy, adaptive", new SimMigrationOptions { PreCopy = o, Pipeline = new SimPipeline(SimCompression.Adaptive) }),
            new("postcopy", new SimMigrationOptions { Strategy = Engine.MigrationStrategy.PostCopy }),
            new("hybrid", new SimMigrationOptions { Strategy = Engine.MigrationStrategy.Hybrid, PreCopy = o }),
        ];
    }

    /// <summary>Observes <paramref name="vm"/> for <paramref name="window"/> (default 2 s, 100 ms intervals) and predicts each case over <paramref name="link"/>.</summary>
    public static Prediction Predict(IVirtualMachine vm, PredictionLink link, TimeSpan? window = null, IReadOnlyList<PredictionCase>? cases = null)
    {
        var observation = VmObserver.Observe(vm, window ?? TimeSpan.FromSeconds(2), TimeSpan.FromMilliseconds(100));
        return Predict(observation, link, cases);
    }

    /// <summary>Predicts each case for an observation (pure: no I/O, deterministic).</summary>
    public static Prediction Predict(VmObservation o, PredictionLink link, IReadOnlyList<PredictionCase>? cases = null, ulong seed = 1)
    {
        var fitted = DirtyFit.Fit(o);
        var results = new List<StrategyPrediction>();
        foreach (var c in cases ?? DefaultCases())
        {
            var options = link.CapBytesPerSecond > 0 ? c.Options with { BandwidthCap = c.Options.BandwidthCap > 0 ? Math.Min(c.Options.BandwidthCap, link.CapBytesPerSecond) : link.CapBytesPerSecond } : c.Options;
            var r = Simulate(o, fitted, link, options, seed);
            results.Add(new StrategyPrediction(c.Name, r.Outcome, r.TotalS * 1000, r.DowntimeMs, r.BytesOnWire, r.Rounds, r.StopReason, r.Error));
        }
        return new Prediction { Observation = o, Fitted = fitted, Link = link, Strategies = results };
    }

    private static SimMigrationResult Simulate(VmObservation o, DirtyPhase fitted, PredictionLink link, SimMigrationOptions options, ulong seed)
    {
        var scheduler = new EventScheduler();
        var network = new FlowNetwork(scheduler);
        SimHost from = new("source"), to = new("destination");
        var route = new SimRoute(from, to, [new SimLink("link", link.BytesPerSecond, link.RoundTrip / 2)]);
        var dirty = new PresentDirtyModel(new DirtyModel(o.PageCount, [fitted], seed), o.PresentPages);
        var content = new ClassMixModel(o.ImageShares, o.WrittenShares, o.BytesChangedPerPage);
        var vm = new SimVm("observed", from, o.PageCount, o.Vcpus, dirty, content, Math.Max(o.StateBytes, 4096), scheduler.Clock);
        var m = new SimMigration(scheduler, network, vm, route, options);
        scheduler.AfterSeconds(0, m.Start);
        scheduler.Run(until: EventScheduler.Nanoseconds(TimeSpan.FromDays(1)), maxEvents: 10_000_000);
        return m.Result ?? throw new InvalidOperationException("the predicted migration did not end within a day of virtual time");
    }
}

/// <summary>A dirty model whose memory is only partly present: round 0 sends the present pages (the first ones — which pages makes no difference to the statistical content model) and the pages written.</summary>
internal sealed class PresentDirtyModel(DirtyModel inner, long present) : IDirtyProcess
{
    public long PageCount => inner.PageCount;
    public void Populated(PageBitmap into) => into.SetRange(0, Math.Clamp(present, 0, inner.PageCount));
    public long Write(double from, double to, PageBitmap? into) => inner.Write(from, to, into);
    public double WritesUpTo(double t) => inner.WritesUpTo(t);
    public double RateAt(double t) => inner.RateAt(t);
}
