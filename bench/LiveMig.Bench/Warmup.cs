using LiveMig.Engine;
using LiveMig.Vm;

namespace LiveMig.Bench;

internal static class Warmup
{
    /// <summary>
    /// One small migration and plain copy before anything is timed, so the first measured run
    /// does not pay for JIT compilation (tiered compilation) of the page path and the hash.
    /// </summary>
    public static void Run()
    {
        for (int i = 0; i < 2; i++)
        {
            LoopbackMigration.Run(new VmConfig { Name = "warmup", MemoryBytes = 64L << 20, Workload = "sweep:rate=100000", Fill = MemoryFill.Mixed },
                // A loaded machine may not converge: the warm-up pauses anyway rather than fail the benchmark.
                new MigrationOptions { PreCopy = new Policies.PreCopyOptions { OnStall = Policies.StallAction.Pause, MaxDowntime = TimeSpan.FromSeconds(30) } });
            LoopbackMigration.Run(new VmConfig { Name = "warmup", MemoryBytes = 64L << 20, Workload = "idle", Fill = MemoryFill.Random }, new MigrationOptions { Verify = false });
            PlainCopy.Run(64L << 20, intoFreshGuestMemory: true);
            PlainCopy.Run(64L << 20, intoFreshGuestMemory: false);
        }
        ThroughputScenario.Progress("warm-up done");
    }
}
