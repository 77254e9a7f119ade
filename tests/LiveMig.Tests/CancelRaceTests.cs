using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>
/// <c>livemig cancel</c> tells the truth: a cancellation either wins (the migration fails and
/// the VM runs on the source) or finds the switch-over begun (the migration completes) —
/// decided atomically with the Commit, whatever the moment it arrives.
/// </summary>
public sealed class CancelRaceTests
{
    /// <summary>Calls the engine's TryCancel when the migration enters <paramref name="phase"/>, once.</summary>
    private sealed class CancelOnPhase(string phase, Func<CancelOutcome> cancel) : IMigrationObserver
    {
        public CancelOutcome? Answer { get; private set; }

        public void Phase(string p)
        {
            if (Answer is null && p.StartsWith(phase, StringComparison.Ordinal)) Answer = cancel();
        }
    }

    private static BuiltInVm Vm() => BuiltInVm.Create(new VmConfig { Name = "c" + Guid.NewGuid().ToString("N")[..8], MemoryBytes = 16L << 20, Vcpus = 1, Workload = "sweep:rate=20000", Fill = MemoryFill.Mixed, Seed = 4 });

    public static TheoryData<string, string, CancelOutcome> Moments => new()
    {
        { "precopy", "live", CancelOutcome.Cancelled },
        { "precopy", "paused", CancelOutcome.Cancelled },   // in the stop-and-copy, before Commit: the VM is resumed here
        { "precopy", "resumed", CancelOutcome.TooLate },
        { "postcopy", "paused", CancelOutcome.Cancelled },
        { "postcopy", "post-copy", CancelOutcome.TooLate },
        { "hybrid", "live", CancelOutcome.Cancelled },
        { "hybrid", "post-copy", CancelOutcome.TooLate },
    };

    [Theory]
    [MemberData(nameof(Moments))]
    public void A_cancellation_either_wins_and_the_vm_runs_on_the_source_or_is_too_late_and_the_migration_completes(string strategy, string phase, CancelOutcome expected)
    {
        using var vm = Vm();
        vm.Start();
        var options = new MigrationOptions
        {
            Strategy = strategy switch { "postcopy" => MigrationStrategy.PostCopy, "hybrid" => MigrationStrategy.Hybrid, _ => MigrationStrategy.PreCopy },
            PreCopy = new PreCopyOptions().PauseOnStall(),
        };
        Func<CancelOutcome>? cancel = null;
        var observer = new CancelOnPhase(phase, () => cancel!());
        MigrationReport? report = null;
        MigrationFailedException? failure = null;
        if (options.Strategy == MigrationStrategy.PreCopy)
        {
            using var loop = new Loopback();
            var engine = new PreCopyMigration(vm, options, observer);
            cancel = engine.TryCancel;
            try { report = engine.MigrateTo("127.0.0.1", loop.Port); } catch (MigrationFailedException e) { failure = e; }
        }
        else
        {
            using var loop = new PostCopyLoopback();
            var engine = new PostCopyMigration(vm, options, observer);
            cancel = engine.TryCancel;
            try { report = engine.MigrateTo("127.0.0.1", loop.Port); } catch (MigrationFailedException e) { failure = e; }
        }
        Assert.Equal(expected, observer.Answer);
        if (expected == CancelOutcome.Cancelled)
        {
            Assert.NotNull(failure);
            Assert.Contains("cancelled", failure!.Message);
            Assert.Equal(VmRunState.Running, vm.State);
        }
        else
        {
            Assert.Null(failure);
            Assert.Equal("completed", report!.Outcome);
            Assert.True(report.Verified);
            Assert.Equal(VmRunState.Stopped, vm.State);
        }
        // After the end, every cancellation says so.
        Assert.Equal(CancelOutcome.Ended, cancel!());
    }
}
