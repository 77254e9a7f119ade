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
        var faults = QemuAgentFaults.Open(qemu, vm.MemoryBytes);
        _demandPaged[vm.MigrationId] = true;
        return faults;
    }

    /// <summary>Arrivals in post-copy: their RAM file is not complete when the device state loads (pages arrive on demand).</summary>
    private readonly ConcurrentDictionary<Guid, bool> _demandPaged = new();

    public string? ArrivalFailure(IncomingVm vm) =>
        _waiting.TryGetValue(vm.MigrationId, out var qemu) && qemu.ExitReason is { } gone
            ? $"destination QEMU (pid {qemu.Pid}) {gone} while the VM was arriving" : null;

    public void Discard(IncomingVm vm)
    {
        _demandPaged.TryRemove(vm.MigrationId, out _);
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
            if (host.HashRamAtSwitchover && !demandPaged) arrived.RamHashBeforeDeviceLoad = memory.ComputeHash();
            LoadDeviceState(qemu, state);
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

    private void LoadDeviceState(QemuProcess qemu, ReadOnlySpan<byte> state)
    {
        string path = Path.Combine(qemu.RunDirectory, "state-in.sock");
        using var cancel = new CancellationTokenSource(host.DeviceStateTimeout);
        qemu.Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = "unix:" + path });
        using (var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            socket.ConnectAsync(new UnixDomainSocketEndPoint(path), cancel.Token).AsTask().GetAwaiter().GetResult();
            socket.Send(state);
            socket.Shutdown(SocketShutdown.Send);
        }
        string status = QemuVm.AwaitMigration(qemu, cancel.Token, out string? error);
        if (status != "completed") throw new QmpException($"QEMU's incoming migration ended '{status}'{(error is null ? "" : ": " + error)}");
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
