using System.Diagnostics;
using System.Net;
using LiveMig.Engine;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// The two reports of one migration, how long the source VM took to build (not part of the
/// migration), and the CPU time of the source's migration thread (this one) and of the
/// destination's receiving thread over the whole migration, and the whole process's CPU time
/// over it (every thread: the source's send thread, the destination's placing thread, the
/// prefaulter, the idle VM's vCPUs, the switch-over's background compilation).
/// </summary>
internal sealed record MigrationResult(MigrationReport Source, MigrationReport Destination, double SetupMs, ThreadCpu SourceCpu, ThreadCpu DestinationCpu, double ProcessCpuSeconds);

/// <summary>
/// One in-process migration over 127.0.0.1: a fresh destination agent, a fresh source VM, the
/// migration, then everything disposed (source VM, arrived VM, listener) so the next run starts
/// with its memory given back.
/// </summary>
internal static class LoopbackMigration
{
    public static MigrationResult Run(VmConfig config, MigrationOptions options, TimeSpan warmup = default, DestinationOptions? destination = null)
    {
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        // Arrived runs on the destination's receiving thread, which started with the connection: its CPU time so far is the migration's.
        ThreadCpu destinationCpu = default;
        var failed = new TaskCompletionSource<MigrationFailedException>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var listener = new MigrationListener(IPAddress.Loopback, 0, destination ?? new DestinationOptions());
        listener.Arrived += a => { destinationCpu = ThreadCpu.Now(); arrived.TrySetResult(a); };
        listener.Failed += f => failed.TrySetResult(f);
        listener.Start();

        long t0 = Stopwatch.GetTimestamp();
        using var vm = BuiltInVm.Create(config);
        vm.Start();
        double setupMs = Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        if (warmup > TimeSpan.Zero) Thread.Sleep(warmup);

        MigrationReport source;
        var cpu0 = ThreadCpu.Now();
        var process0 = Process.GetCurrentProcess().TotalProcessorTime;
        ThreadCpu sourceCpu;
        try
        {
            source = new PreCopyMigration(vm, options).MigrateTo("127.0.0.1", listener.Port);
            sourceCpu = ThreadCpu.Now() - cpu0;
        }
        catch (MigrationFailedException e)
        {
            string dest = failed.Task.Wait(TimeSpan.FromSeconds(5)) ? $"; destination: {failed.Task.Result.Message}" : "";
            throw new InvalidOperationException($"migration of {config.Workload} failed: {e.Message}{dest}", e);
        }
        var done = Task.WhenAny(arrived.Task, failed.Task);
        if (!done.Wait(TimeSpan.FromSeconds(60))) throw new TimeoutException("destination did not report the arrival");
        if (failed.Task.IsCompleted) throw new InvalidOperationException($"destination failed: {failed.Task.Result.Message}");
        var a = arrived.Task.Result;
        double processCpu = (Process.GetCurrentProcess().TotalProcessorTime - process0).TotalSeconds;
        // Stop the arrived VM's vCPUs now; listener.Dispose frees its memory.
        a.Vm.Stop();
        return new MigrationResult(source, a.Report, setupMs, sourceCpu, destinationCpu, processCpu);
    }
}
