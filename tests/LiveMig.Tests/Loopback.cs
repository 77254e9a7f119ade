using System.Net;
using LiveMig.Engine;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>A destination agent on 127.0.0.1 and a source, in one process, over real TCP.</summary>
internal sealed class Loopback : IDisposable
{
    private readonly System.Collections.Concurrent.BlockingCollection<ArrivedVm> _arrived = [];
    private readonly TaskCompletionSource<MigrationFailedException> _failed = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public Loopback(DestinationOptions? options = null)
    {
        Listener = new MigrationListener(IPAddress.Loopback, 0, options ?? new DestinationOptions());
        Listener.Arrived += a =>
        {
            // A migration may arrive after the test is over (the Loopback disposed): nobody takes it then.
            try { _arrived.Add(a); }
            catch (Exception e) when (e is ObjectDisposedException or InvalidOperationException) { a.Vm.Dispose(); }
        };
        Listener.Failed += f => _failed.TrySetResult(f);
        Listener.Start();
    }

    public MigrationListener Listener { get; }
    public int Port => Listener.Port;

    public (MigrationReport Source, ArrivedVm Arrived) Migrate(IVirtualMachine vm, MigrationOptions? options = null, IMigrationObserver? observer = null)
    {
        var report = new PreCopyMigration(vm, options ?? new MigrationOptions(), observer).MigrateTo("127.0.0.1", Port);
        // One arrival per migration, in order (a Loopback can take several: gang migration).
        Assert.True(_arrived.TryTake(out var arrived, TimeSpan.FromSeconds(30)), "destination did not report the arrival");
        return (report, arrived);
    }

    public MigrationFailedException DestinationFailure()
    {
        Assert.True(_failed.Task.Wait(TimeSpan.FromSeconds(30)), "destination did not report a failure");
        return _failed.Task.Result;
    }

    public void Dispose()
    {
        Listener.Dispose();
        _arrived.Dispose();
    }
}
