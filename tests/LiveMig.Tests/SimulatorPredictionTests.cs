using LiveMig.Memory;
using LiveMig.Simulation;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary><c>livemig predict</c>'s parts: the dirty model fitted to an observed curve, and a prediction against the real migration that follows it.</summary>
public sealed class SimulatorPredictionTests
{
    private static VmObservation Observed(DirtyPhase truth, long pages, double interval, int intervals) => new()
    {
        PageCount = pages, PresentPages = pages, WindowS = interval * intervals, IntervalS = interval,
        Curve = Enumerable.Range(0, (int)Math.Log2(intervals) + 1).Select(k => new DirtyCurvePoint(interval * (1 << k), DirtyFit.Distinct(truth, interval * (1 << k)))).ToList(),
        WorkingSetPages = (long)DirtyFit.Distinct(truth, interval * intervals),
        ImageShares = [1, 0, 0, 0, 0, 0, 0], WrittenShares = [0, 0, 0, 0, 0, 1, 0],
    };

    [Theory]
    [InlineData(5000, 8192, 0, 0)]          // uniform over 32 MiB
    [InlineData(20000, 65536, 0.05, 0.8)]   // a hot set
    [InlineData(2000, 262144, 0, 0)]        // a working set the window does not cover
    public void The_fit_reproduces_the_observed_curve_and_extends_it_beyond_the_window(double rate, long set, double hot, double hotWrites)
    {
        var truth = new DirtyPhase(0, rate, set, hot, hotWrites);
        var o = Observed(truth, 262144, 0.1, 16);
        var fit = DirtyFit.Fit(o);
        foreach (var p in o.Curve) Assert.InRange(DirtyFit.Distinct(fit, p.SpanS) / p.MeanPages, 0.97, 1.03);
        // Rounds longer than the window: the fit must still be near the truth (the window showed the curve bending or not).
        Assert.InRange(DirtyFit.Distinct(fit, 5) / DirtyFit.Distinct(truth, 5), 0.85, 1.15);
        Assert.Equal(0, DirtyFit.Fit(Observed(new DirtyPhase(0, 0, set), 262144, 0.1, 16)).Rate);
    }

    [Fact]
    public void A_prediction_made_before_the_migration_is_near_what_the_migration_then_does()
    {
        ScenarioValidator.WarmUp(); // the first migration in a process pays the JIT, which the model has not
        var loopback = LoopbackLink.Measure(64L << 20, 50);
        double cap = 400e6 / 8;
        using var vm = BuiltInVm.Create(new VmConfig { Name = "predicted", MemoryBytes = 64L << 20, Vcpus = 2, Workload = "random:rate=3000,range=16MiB", Seed = 11, Fill = MemoryFill.Mixed });
        vm.Start();
        Wait.Until(() => vm.Operations > 300);
        var observation = VmObserver.Observe(vm, TimeSpan.FromSeconds(1), TimeSpan.FromMilliseconds(100), seed: 11);
        Assert.Equal(10, observation.PerInterval.Count);
        Assert.True(observation.WorkingSetPages > 0 && observation.WorkingSetPages <= 4096, $"written pages {observation.WorkingSetPages} within the 16 MiB range");
        var prediction = MigrationPredictor.Predict(observation, new PredictionLink(loopback.BytesPerSecond, loopback.RoundTrip, cap));
        var pre = prediction.Strategies[0];
        Assert.Equal("precopy", pre.Strategy);
        Assert.Equal("completed", pre.Outcome);

        using var loopback2 = new Loopback();
        var (actual, arrived) = loopback2.Migrate(vm, ScenarioValidator.EngineOptions(new SimMigrationOptions { BandwidthCap = cap }));
        arrived.Vm.Stop();
        Assert.Equal("completed", actual.Outcome);
        Assert.True(actual.Verified);
        // Tolerance (docs/simulator.md, "Prediction"): bytes within 15%; total time within −60%…+30% — one-sided because
        // on a loaded shared machine the real run only ever gets slower than the model, which has no CPU contention.
        string figures = $"predicted {pre}, actual {actual.TotalTimeMs:0} ms {actual.BytesOnWire} B {actual.Rounds.Count} rounds";
        Assert.True(Math.Abs((double)pre.BytesOnWire / actual.BytesOnWire - 1) < 0.15, figures);
        Assert.True((pre.TotalMs - actual.TotalTimeMs) / actual.TotalTimeMs is > -0.6 and < 0.3, figures);
        Assert.True(Math.Abs(pre.Rounds - actual.Rounds.Count) <= 2, figures);
    }
}
