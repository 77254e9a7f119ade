using System.Collections.Concurrent;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Qemu;

/// <summary>
/// Makes arriving QEMU guests (kind "qemu") at a destination. At Hello: checks the description
/// the source sent (<see cref="QemuVmSpec"/>, its boot image inside the directories this host
/// allows), makes the guest's RAM file, starts QEMU on it with <c>-incoming defer -S</c> (it maps
/// the file and waits), and maps the same file for the pages LiveMig places. At restore — every
/// page placed, so the RAM file is complete — QEMU loads the device state from a Unix socket
/// (<c>migrate-incoming</c>) and stays paused until <see cref="IVirtualMachine.Resume"/> says <c>cont</c>.
/// A failure before that kills the waiting QEMU and deletes its files (<see cref="Discard"/>).
/// In post-copy the device state loads before the pages have arrived: QEMU's faults on them are
/// caught in QEMU's own mapping and served by LiveMig (<see cref="OpenRemoteFaults"/>).
/// </summary>
public sealed class QemuVmFactory(QemuHostOptions host) : IVmFactory
{
    private readonly ConcurrentDictionary<Guid, QemuProcess> _waiting = new();

    public string Kind => QemuVm.KindName;

    /// <summary>The QEMU processes waiting for their device state (arrivals in progress).</summary>
    internal IReadOnlyCollection<QemuProcess> WaitingProcesses => [.. _waiting.Values];
    public QemuHostOptions Host => host;

    public string? Refusal(IncomingVm vm)
    {
        QemuVmSpec spec;
        try { spec = QemuVmSpec.Parse(vm.Spec); }
        catch (InvalidDataException e) { return e.Message; }
        if (spec.MemoryBytes != vm.MemoryBytes) return $"QEMU VM description: memoryBytes {spec.MemoryBytes} differs from the Hello's {vm.MemoryBytes}";
        if (spec.Vcpus != vm.Vcpus) return $"QEMU VM description: vcpus {spec.Vcpus} differs from the Hello's {vm.Vcpus}";
        return host.Refusal(spec);
    }

    public VmMemory CreateMemory(IncomingVm vm)
    {
        // Checked again: a caller may skip Refusal.
        if (Refusal(vm) is { } why) throw new VmFailedException(why);
        var qemu = QemuProcess.Start(QemuVmSpec.Parse(vm.Spec), host, vm.Name, incoming: true);
        try
        {
            var memory = GuestMemory.Open(qemu.RamFile, vm.MemoryBytes);
            if (!_waiting.TryAdd(vm.MigrationId, qemu)) { memory.Dispose(); throw new VmFailedException($"migration {vm.MigrationId} is already arriving here"); }
            return new VmMemory(memory, Populated: false);
        }
        catch
        {
            qemu.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Post-copy: the agent in the waiting QEMU registers QEMU's mapping of the RAM file with
    /// userfaultfd (MISSING) and passes the descriptor (<see cref="QemuAgentFaults"/>), before
    /// the device state is loaded — loading reads guest RAM, and those reads fault and wait too.
    /// </summary>
    public RemoteFaults? OpenRemoteFaults(IncomingVm vm)
    {
        if (!_waiting.TryGetValue(vm.MigrationId, out var qemu)) throw new VmFailedException($"no QEMU is waiting for migration {vm.MigrationId}");
        // Registered before the pause (PrepareThreads) where it could be: the switch only takes it.
        var faults = _early.TryGetValue(vm.MigrationId, out var early) && early.TakeFaults() is { } f ? f : QemuAgentFaults.Open(qemu, vm.MemoryBytes);
        _demandPaged[vm.MigrationId] = true;
        return faults;
    }

    /// <summary>
    /// At the first frame after the Hello of a migration that may go post-copy, while pages are
    /// still to come: QEMU's incoming migration is opened (<c>migrate-incoming</c>, connected,
    /// nothing sent: QEMU waits for the stream's first bytes without touching guest RAM) and the
    /// agent registers QEMU's mapping with userfaultfd, so the switch pays neither (QEMU's
    /// incoming set-up, the agent's round trip). A page absent from the file faults from now on
    /// — nothing in QEMU touches guest RAM before the device state loads — and
    /// <see cref="Restore"/> of a migration that did not go post-copy releases the registration
    /// first. Best effort: what fails here is done again at the switch, as before.
    /// </summary>
    public ParkedThreads? PrepareThreads(IncomingVm vm)
    {
        if (!vm.MayPostCopy || !_waiting.TryGetValue(vm.MigrationId, out var qemu)) return null;
        var early = new EarlyIncoming();
        try
        {
            early.State = OpenIncoming(qemu, out early.Ended);
            if (qemu.AgentSocket is not null) early.Faults = QemuAgentFaults.Open(qemu, vm.MemoryBytes);
        }
        catch (Exception e) when (e is QmpException or SocketException or VmFailedException or OperationCanceledException) { }
        if (!_early.TryAdd(vm.MigrationId, early)) early.Dispose();
        WarmSwitch();
        return null;
    }

    public IEnumerable<Type> SwitchoverTypes => [typeof(QemuVm), typeof(QemuAgentFaults), typeof(QmpClient), typeof(QemuProcess), typeof(EarlyIncoming)];

    private readonly ConcurrentDictionary<Guid, EarlyIncoming> _early = new();

    /// <summary>
    /// The dictionaries' operations the switch makes, once on a key no arrival has: keyed by a
    /// value type (Guid), they were compiled in the pause even from the ReadyToRun build.
    /// </summary>
    private void WarmSwitch()
    {
        var none = Guid.NewGuid();
        _demandPaged[none] = false;
        _demandPaged.TryRemove(none, out _);
        _early.TryRemove(none, out _);
        _waiting.TryRemove(none, out _);
        _waiting.TryGetValue(none, out _);
    }

    /// <summary>What <see cref="PrepareThreads"/> opened for one arrival.</summary>
    private sealed class EarlyIncoming : IDisposable
    {
        public Socket? State;
        public Task<QmpEvent>? Ended;
        public RemoteFaults? Faults;

        public RemoteFaults? TakeFaults() { var f = Faults; Faults = null; return f; }

        /// <summary>Not taken by a post-copy switch: the agent unregisters QEMU's range (else its reads of holes would wait for ever), and our copy closes.</summary>
        public void ReleaseFaults()
        {
            if (TakeFaults() is not { } f) return;
            f.Release();
            Linux.Native.close(f.Userfaultfd);
        }

        public void Dispose()
        {
            ReleaseFaults();
            State?.Dispose();
            State = null;
        }
    }

    /// <summary>Arrivals in post-copy: their RAM file is not complete when the device state loads (pages arrive on demand).</summary>
    private readonly ConcurrentDictionary<Guid, bool> _demandPaged = new();

    public string? ArrivalFailure(IncomingVm vm) =>
        _waiting.TryGetValue(vm.MigrationId, out var qemu) && qemu.ExitReason is { } gone
            ? $"destination QEMU (pid {qemu.Pid}) {gone} while the VM was arriving" : null;

    public void Discard(IncomingVm vm)
    {
        _demandPaged.TryRemove(vm.MigrationId, out _);
        if (_early.TryRemove(vm.MigrationId, out var early)) early.Dispose();
        if (_waiting.TryRemove(vm.MigrationId, out var qemu)) qemu.Dispose();
    }

    /// <summary>
    /// Loads the device state into the waiting QEMU: the RAM file holds every page by now. QEMU
    /// that refuses the state, or has died, is an <see cref="InvalidDataException"/> naming what
    /// happened (the destination fails the migration with it at Prepare, after verification).
    /// </summary>
    public IVirtualMachine Restore(IncomingVm vm, GuestMemory memory, ReadOnlySpan<byte> state, ParkedThreads? threads)
    {
        if (!_waiting.TryRemove(vm.MigrationId, out var qemu)) throw new InvalidOperationException($"no QEMU is waiting for migration {vm.MigrationId}");
        var arrived = new QemuVm(vm.Name, qemu, memory, host, VmRunState.Paused, vm.Vcpus) { Arrival = vm };
        try
        {
            // In post-copy the file is not complete yet (the pages' hashes as placed are compared at the end instead).
            bool demandPaged = _demandPaged.TryRemove(vm.MigrationId, out _);
            _early.TryRemove(vm.MigrationId, out var early);
            using (early)
            {
                // A hybrid that converged in its rounds switches like pre-copy: no faults to serve.
                if (!demandPaged) early?.ReleaseFaults();
                if (host.HashRamAtSwitchover && !demandPaged) arrived.RamHashBeforeDeviceLoad = memory.ComputeHash();
                LoadDeviceState(qemu, state, early);
            }
            return arrived;
        }
        catch (Exception e) when (e is QmpException or SocketException or OperationCanceledException)
        {
            string why = qemu.Explain(e);
            arrived.Detach(); // the caller disposes the memory; the RAM file goes with the QEMU
            qemu.OwnsRamFile = true;
            qemu.Dispose();
            throw new InvalidDataException($"destination QEMU could not load the device state: {why}", e);
        }
    }

    /// <summary>
    /// <c>migrate-incoming</c> on a Unix socket in QEMU's run directory, connected; the MIGRATION
    /// event that ends it registered first (capability <c>events</c>).
    /// </summary>
    private Socket OpenIncoming(QemuProcess qemu, out Task<QmpEvent> ended)
    {
        string path = Path.Combine(qemu.RunDirectory, "state-in.sock");
        using var cancel = new CancellationTokenSource(host.DeviceStateTimeout);
        ended = qemu.Qmp.NextEvent("MIGRATION", e => e.Data?["status"]?.GetValue<string>() is "completed" or "failed" or "cancelled");
        qemu.Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = "unix:" + path });
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try { socket.ConnectAsync(new UnixDomainSocketEndPoint(path), cancel.Token).AsTask().GetAwaiter().GetResult(); }
        catch { socket.Dispose(); throw; }
        return socket;
    }

    /// <summary>Sends the device state to QEMU's incoming migration (opened early, or now) and waits for QEMU's verdict.</summary>
    private void LoadDeviceState(QemuProcess qemu, ReadOnlySpan<byte> state, EarlyIncoming? early)
    {
        Task<QmpEvent> ended;
        Socket socket;
        if (early is { State: { } opened, Ended: { } e }) { (socket, ended) = (opened, e); early.State = null; }
        else socket = OpenIncoming(qemu, out ended);
        using (socket)
        {
            socket.Send(state);
            socket.Shutdown(SocketShutdown.Send);
        }
        string status;
        try
        {
            if (!ended.Wait(host.DeviceStateTimeout)) throw new OperationCanceledException($"QEMU did not load the device state within {host.DeviceStateTimeout.TotalSeconds:0.#} s");
            status = ended.Result.Data?["status"]?.GetValue<string>() ?? "?";
        }
        catch (AggregateException a) when (a.InnerException is QmpException q) { throw q; }
        if (status == "completed") return;
        string? error = (qemu.Qmp.Execute("query-migrate") as JsonObject)?["error-desc"]?.GetValue<string>();
        throw new QmpException($"QEMU's incoming migration ended '{status}'{(error is null ? "" : ": " + error)}");
    }

    /// <summary>The source came back after the state was loaded (the VM never ran): a fresh waiting QEMU over the same RAM file, which takes pages again.</summary>
    public GuestMemory Unrestore(IVirtualMachine vm)
    {
        var q = (QemuVm)vm;
        var arrival = q.Arrival ?? throw new InvalidOperationException("this QEMU VM was not restored here");
        var (memory, old) = q.Detach();
        old.Dispose();
        var fresh = QemuProcess.Start(QemuVmSpec.Parse(arrival.Spec), host, arrival.Name, incoming: true, ramFile: old.RamFile);
        fresh.OwnsRamFile = true;
        _waiting[arrival.MigrationId] = fresh;
        return memory;
    }
}
