using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// The VMs an agent holds, by unique name, and the migrations in progress there, in and out:
/// what <c>livemig list</c>, <c>status</c>, <c>stop</c>, <c>start</c>, <c>destroy</c> and
/// <c>migrate --vm</c> act on. A <see cref="MigrationListener"/> owns one and hands it to every
/// <see cref="IncomingMigration"/>: a Hello naming a VM that runs here, or is arriving, is
/// refused. Errors are one-line <see cref="InvalidOperationException"/>s for the operator.
/// </summary>
public sealed class VmRegistry : IDisposable
{
    private readonly Lock _lock = new();
    private readonly TimeProvider _time;
    private readonly Dictionary<string, Hosted> _vms = new(StringComparer.Ordinal);
    /// <summary>Names taken by migrations arriving now (reserved at Hello), with their live figures.</summary>
    private readonly Dictionary<string, MigrationProgress> _arriving = new(StringComparer.Ordinal);
    private readonly Dictionary<Guid, MigrationProgress> _migrations = [];

    private sealed class Hosted(IVirtualMachine vm, DateTimeOffset since, Guid? arrivedBy, IDisposable? budget = null)
    {
        public IVirtualMachine Vm { get; } = vm;
        /// <summary>Its share of the agent's memory budget (reserved at its Hello), given back when it leaves.</summary>
        public IDisposable? Budget { get; } = budget;
        public DateTimeOffset Since { get; } = since;
        public Guid? ArrivedBy { get; } = arrivedBy;
        /// <summary>The migration taking it away now, and a signal when that one is over.</summary>
        public OutgoingMigration? Leaving { get; set; }
        public ManualResetEventSlim? Left { get; set; }
    }

    public VmRegistry(TimeProvider? time = null) => _time = time ?? TimeProvider.System;

    /// <summary>Raised after a VM arrived (or was added) and runs here.</summary>
    public event Action<IVirtualMachine>? Added;

    /// <summary>Raised after a VM left for good: <c>destroyed</c>, or <c>migrated</c> elsewhere (its memory is freed right after).</summary>
    public event Action<IVirtualMachine, string>? Removed;

    public IReadOnlyCollection<IVirtualMachine> Vms
    {
        get { lock (_lock) return [.. _vms.Values.Select(h => h.Vm)]; }
    }

    public IVirtualMachine? Find(string name)
    {
        lock (_lock) return _vms.TryGetValue(name, out var h) ? h.Vm : null;
    }

    /// <summary>A VM that runs here without having arrived (a <c>livemig migrate</c> process's own).</summary>
    public void Add(IVirtualMachine vm)
    {
        lock (_lock)
        {
            if (Taken(vm.Name) is { } why) throw new InvalidOperationException(why);
            _vms[vm.Name] = new Hosted(vm, _time.GetUtcNow(), null);
        }
        Added?.Invoke(vm);
    }

    // ---- arrivals (IncomingMigration) ----

    /// <summary>Takes the Hello's name for its migration; why not, when a VM of that name runs or arrives here.</summary>
    internal string? TryReserve(MigrationProgress arriving)
    {
        lock (_lock)
        {
            if (Taken(arriving.VmName) is { } why) return why;
            _arriving[arriving.VmName] = arriving;
            _migrations[arriving.MigrationId] = arriving;
            return null;
        }
    }

    private string? Taken(string name) =>
        _vms.ContainsKey(name) ? $"a VM named '{name}' already runs here (give the source another --name)"
        : _arriving.ContainsKey(name) ? $"a VM named '{name}' is arriving here already (give the source another --name)"
        : null;

    /// <summary>The migration delivered its VM: it runs here under the name it reserved, holding its share of the memory budget until it leaves.</summary>
    internal void Arrived(MigrationProgress arriving, IVirtualMachine vm, IDisposable? budget = null)
    {
        lock (_lock) _vms[arriving.VmName] = new Hosted(vm, _time.GetUtcNow(), arriving.MigrationId, budget);
        Added?.Invoke(vm);
    }

    /// <summary>The arriving migration ended (delivered or failed): its reservation and figures go.</summary>
    internal void EndArrival(MigrationProgress arriving)
    {
        lock (_lock)
        {
            if (_arriving.TryGetValue(arriving.VmName, out var p) && ReferenceEquals(p, arriving)) _arriving.Remove(arriving.VmName);
            _migrations.Remove(arriving.MigrationId);
        }
    }

    // ---- what an operator asks ----

    public AgentListing List()
    {
        lock (_lock)
        {
            return new AgentListing
            {
                Vms = [.. _vms.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => Info(kv.Key, kv.Value))],
                Migrations = [.. _migrations.Values.Select(m => m.Snapshot()).OrderBy(s => s.StartedAt)],
            };
        }
    }

    private static HostedVmInfo Info(string name, Hosted h) => new()
    {
        Name = name, Kind = h.Vm.Kind, MemoryBytes = h.Vm.Memory.Size, Vcpus = h.Vm.VcpuCount, Workload = h.Vm.Description,
        State = h.Leaving is not null ? "migrating" : h.Vm.State.ToString().ToLowerInvariant(),
        Since = h.Since, ArrivedBy = h.ArrivedBy?.ToString(), LeavingBy = h.Leaving?.MigrationId.ToString(),
    };

    /// <summary>The live figures of migration <paramref name="id"/> in progress here; null when none.</summary>
    public MigrationStatus? Status(Guid id)
    {
        lock (_lock) return _migrations.TryGetValue(id, out var p) ? p.Snapshot() : null;
    }

    /// <summary>Figures of a migration that is not an arrival (e.g. a <c>livemig migrate</c> process's own), shown by <see cref="List"/> and <see cref="Status"/> until <see cref="Untrack"/>.</summary>
    public void Track(MigrationProgress progress)
    {
        lock (_lock) _migrations[progress.MigrationId] = progress;
    }

    public void Untrack(Guid id)
    {
        lock (_lock) _migrations.Remove(id);
    }

    /// <summary>Pauses the VM's vCPUs (its memory stays); <see cref="Start"/> resumes them.</summary>
    public void Stop(string name) => Settled(name, "stopped").Pause();

    public void Start(string name) => Settled(name, "started").Resume();

    /// <summary>Ends the VM and frees its memory and vCPU threads; it is gone from this agent.</summary>
    public void Destroy(string name)
    {
        Hosted h;
        lock (_lock)
        {
            Settled(name, "destroyed");
            h = _vms[name];
            _vms.Remove(name);
        }
        h.Vm.Dispose();
        h.Budget?.Dispose();
        Removed?.Invoke(h.Vm, "destroyed");
    }

    /// <summary>The VM of that name, not leaving; else a one-line refusal of <paramref name="what"/>.</summary>
    private IVirtualMachine Settled(string name, string what)
    {
        lock (_lock)
        {
            if (!_vms.TryGetValue(name, out var h)) throw new InvalidOperationException($"no VM named '{name}' here");
            if (h.Leaving is not null) throw new InvalidOperationException($"VM '{name}' is migrating ({h.Leaving.MigrationId}) and cannot be {what} now: cancel that migration first");
            return h.Vm;
        }
    }

    // ---- onward migration ----

    /// <summary>
    /// Migrates VM <paramref name="name"/> from here to the agent at host:port with the usual
    /// engine. The VM leaves this registry (and its memory is freed) only once the migration
    /// completed; on failure it keeps running here (or stays paused, after a switch-over whose
    /// outcome the source cannot know: the report says so). <paramref name="started"/> sees the
    /// migration before it connects (its ID; a control socket's cancel).
    /// </summary>
    public MigrationReport MigrateAway(string name, MigrationOptions options, string host, int port, IMigrationObserver? observer = null,
        Action<OutgoingMigration>? started = null, CancellationToken cancel = default)
    {
        var fan = new ObserverFanOut();
        if (observer is not null) fan.Add(observer);
        var (h, migration) = Depart(name, options, fan, $"{host}:{port}");
        try
        {
            started?.Invoke(migration);
            var report = migration.MigrateTo(host, port, cancel);
            Leave(name, h, migration, gone: true);
            return report;
        }
        catch
        {
            Leave(name, h, migration, gone: false);
            throw;
        }
    }

    /// <summary>Marks the VM as leaving on a new migration, whose figures are listed from now on.</summary>
    private (Hosted, OutgoingMigration) Depart(string name, MigrationOptions options, ObserverFanOut observer, string peer)
    {
        lock (_lock)
        {
            var vm = Settled(name, "migrated");
            if (vm.State != VmRunState.Running) throw new InvalidOperationException($"VM '{name}' is {vm.State.ToString().ToLowerInvariant()}: start it ('livemig start {name}') before migrating it");
            var h = _vms[name];
            var migration = new OutgoingMigration(vm, options, observer);
            var progress = new MigrationProgress(migration.MigrationId, "source", Migrations.Name(options.Strategy), name, vm.Memory.Size, peer, _time)
            {
                BandwidthLimit = () => migration.Limiter.BytesPerSecond,
            };
            observer.Add(progress);
            (h.Leaving, h.Left) = (migration, new ManualResetEventSlim());
            _migrations[migration.MigrationId] = progress;
            return (h, migration);
        }
    }

    private void Leave(string name, Hosted h, OutgoingMigration migration, bool gone)
    {
        lock (_lock)
        {
            _migrations.Remove(migration.MigrationId);
            h.Leaving = null;
            if (gone) _vms.Remove(name);
        }
        h.Left!.Set();
        if (!gone) return;
        // It runs at the destination now; here it was stopped by the switch-over: free its memory.
        h.Vm.Dispose();
        h.Budget?.Dispose();
        Removed?.Invoke(h.Vm, "migrated");
    }

    /// <summary>The migration taking a VM away from here, by ID; null when none.</summary>
    public OutgoingMigration? Outgoing(Guid id)
    {
        lock (_lock) return _vms.Values.Select(h => h.Leaving).FirstOrDefault(m => m?.MigrationId == id);
    }

    /// <summary>Ends every VM held here. A VM still leaving is cancelled first and, if its migration does not end within 10 s, left alone (its engine may still read its memory).</summary>
    public void Dispose()
    {
        List<Hosted> all;
        lock (_lock) all = [.. _vms.Values];
        foreach (var h in all) h.Leaving?.Cancel();
        foreach (var h in all)
        {
            if (h.Left is { } left && !left.Wait(TimeSpan.FromSeconds(10))) continue;
            h.Vm.Dispose();
            h.Budget?.Dispose();
        }
        lock (_lock) _vms.Clear();
    }
}

/// <summary>Forwards a migration's events to every observer added (before or while it runs).</summary>
public sealed class ObserverFanOut : IMigrationObserver
{
    private volatile IMigrationObserver[] _all = [];
    private readonly Lock _lock = new();

    public void Add(IMigrationObserver observer)
    {
        lock (_lock) _all = [.. _all, observer];
    }

    public void RoundStarted(int round, long pagesToSend, bool final) { foreach (var o in _all) o.RoundStarted(round, pagesToSend, final); }
    public void Progress(int round, long sent, long total, long bytes) { foreach (var o in _all) o.Progress(round, sent, total, bytes); }
    public void RoundCompleted(RoundReport r) { foreach (var o in _all) o.RoundCompleted(r); }
    public void Phase(string phase) { foreach (var o in _all) o.Phase(phase); }
}
