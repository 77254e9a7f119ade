using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// The built-in VM's brakes on made-up timestamps: a model vCPU that writes a batch of pages per
/// step, each step taking a fixed time, and sleeps exactly what its pacer says. Rates come out of
/// the arithmetic, not out of a loaded machine's scheduler.
/// </summary>
public class VcpuPacerTests
{
    private const long Frequency = 1_000_000_000; // nanoseconds

    /// <summary>Runs the model vCPU for <paramref name="seconds"/>; returns its page writes and the time it spent running (not asleep).</summary>
    private static (long Writes, double RunningSeconds) Run(double seconds, int writesPerStep, long stepNs, double limit, double throttle)
    {
        var pacer = new VcpuPacer(Frequency);
        long now = 0, end = (long)(seconds * Frequency), writes = 0, running = 0;
        pacer.Restart(now);
        while (now < end)
        {
            now += stepNs;
            running += stepNs;
            writes += writesPerStep;
            double debtMs = pacer.DirtyLimitDoze(writesPerStep, now, limit);
            now += (long)(debtMs * 1_000_000);
            double throttleMs = pacer.ThrottleDoze(now, throttle);
            if (throttleMs > 0)
            {
                now += (long)(throttleMs * 1_000_000);
                pacer.SliceStarted(now);
            }
        }
        return (writes, running / (double)Frequency);
    }

    [Theory]
    [InlineData(2000, 256, 10_000)]   // the test VM's shape: 256 writes per step, fast steps
    [InlineData(500, 1, 1_000)]       // one write per step
    [InlineData(100_000, 64, 50_000)] // a limit above what the step rate can reach in bursts
    public void Dirty_limit_holds_a_fast_writer_to_the_limit(double limit, int writesPerStep, long stepNs)
    {
        var (writes, _) = Run(10, writesPerStep, stepNs, limit, throttle: 0);
        double unlimited = writesPerStep * (10.0 * Frequency / stepNs);
        double expected = Math.Min(limit * 10, unlimited);
        // The burst credit and one step's writes are all it may exceed by.
        Assert.InRange(writes, expected * 0.98, expected + limit * VcpuPacer.DirtyLimitBurstSeconds + writesPerStep + 1);
    }

    [Fact]
    public void Without_a_limit_the_pacer_never_sleeps_and_a_lifted_limit_leaves_no_debt()
    {
        var pacer = new VcpuPacer(Frequency);
        pacer.Restart(0);
        Assert.True(pacer.DirtyLimitDoze(10_000, 1_000, limit: 100) > 0); // deep in debt
        Assert.Equal(0, pacer.DirtyLimitDoze(10_000, 2_000, limit: 0));   // lifted: forgotten
        Assert.Equal(0, pacer.DirtyLimitDoze(0, 3_000, limit: 100));      // and the old debt is not owed under a new limit
    }

    [Fact]
    public void Debts_below_a_millisecond_are_carried_not_slept()
    {
        var pacer = new VcpuPacer(Frequency);
        pacer.Restart(0);
        // Limit 1000/s: the credit grows to its cap of 10 writes in 10 ms (and no further in 20 ms).
        const long ms = 1_000_000;
        Assert.Equal(0, pacer.DirtyLimitDoze(0, 20 * ms, 1000));
        Assert.Equal(0, pacer.DirtyLimitDoze(10, 20 * ms, 1000));    // spends it exactly
        Assert.Equal(0, pacer.DirtyLimitDoze(0, 20 * ms + ms / 2, 1000)); // half a write earned: no debt
        Assert.Equal(0, pacer.DirtyLimitDoze(1, 20 * ms + ms / 2, 1000)); // half a millisecond owed: carried
        Assert.Equal(1.5, pacer.DirtyLimitDoze(1, 20 * ms + ms / 2, 1000), 6); // now 1.5 ms: slept
    }

    [Theory]
    [InlineData(0.5)]
    [InlineData(0.9)]
    [InlineData(0.99)]
    public void Throttle_lets_the_vcpu_run_one_minus_the_fraction_of_the_time(double fraction)
    {
        var (_, running) = Run(100, 1, 100_000, limit: 0, throttle: fraction);
        Assert.InRange(running / 100, (1 - fraction) * 0.95, (1 - fraction) * 1.05);
    }

    [Fact]
    public void Throttle_sleeps_only_after_a_whole_timeslice()
    {
        var pacer = new VcpuPacer(Frequency);
        pacer.Restart(0);
        long slice = (long)(VcpuPacer.Timeslice.TotalSeconds * Frequency);
        Assert.Equal(0, pacer.ThrottleDoze(slice - 1, 0.75));
        Assert.Equal(VcpuPacer.Timeslice.TotalMilliseconds * 3, pacer.ThrottleDoze(slice, 0.75), 9);
        pacer.SliceStarted(slice + 30_000_000);
        Assert.Equal(0, pacer.ThrottleDoze(slice + 30_000_001, 0.75));
        Assert.Equal(0, pacer.ThrottleDoze(10 * slice, 0)); // unthrottled: never, and the slice restarts
        Assert.Equal(0, pacer.ThrottleDoze(10 * slice + 1, 0.75));
    }
}
