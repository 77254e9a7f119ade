using System.Net.Sockets;
using System.Text.Json.Nodes;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Qemu;

/// <summary>
/// A QEMU guest behind <see cref="IVirtualMachine"/>, at either end: its RAM is a shared file
/// (memory-backend-file, share=on) that LiveMig maps with <see cref="GuestMemory.Open(string, long?, long)"/>
/// and moves page by page; pause and resume are QMP <c>stop</c>/<c>cont</c>; the vCPU count comes
/// from <c>query-cpus-fast</c>; the VM state is QEMU's own migration stream with
/// <c>x-ignore-shared</c> — device and vCPU state only, about 0.3 MB — which QEMU writes to a
/// Unix socket LiveMig listens on (<see cref="SaveState"/>), and which the destination's
/// factory feeds to a QEMU started with <c>-incoming defer</c> (<see cref="QemuVmFactory"/>).
/// Writes are QEMU's, through its own mapping: found by the agent preloaded into QEMU
/// (<see cref="QemuAgentDirtyLog"/>), or by content (<see cref="PageHashDirtyLog"/>) where it cannot work. No brakes: QEMU throttles vCPUs only inside its own migration, and its dirty limit
/// (<c>set-vcpu-dirty-limit</c>) needs KVM's dirty ring.
/// </summary>
public sealed class QemuVm : IVirtualMachine
{
    public const string KindName = "qemu";
    /// <summary>Largest device state accepted from QEMU (the boot-sector guest's is about 0.3 MB).</summary>
    public const int MaxStateBytes = 256 << 20;
    public const string NoBrakes = "a QEMU guest has no brakes LiveMig can apply: QEMU throttles vCPUs only inside its own migration (auto-converge), and its dirty limit (set-vcpu-dirty-limit) needs KVM's dirty ring, which TCG has not";
    public const string DemandPagingIsQemus = "a QEMU guest's missing pages are always caught where QEMU faults on them (userfaultfd registered by the agent in the destination QEMU) and served by LiveMig's native fault loop";

    private readonly QemuProcess _qemu;
    private readonly QemuHostOptions _host;
    private GuestMemory? _memory;
    private readonly Lazy<IDirtyLog> _dirtyLog;
    private int _stateSaves;
    /// <summary>The device state saved since the last pause, while the VM has not run since: QEMU refuses to migrate again from "postmigrate", and the state has not changed.</summary>
    private byte[]? _savedState;

    internal QemuVm(string name, QemuProcess qemu, GuestMemory memory, QemuHostOptions host, VmRunState state, int vcpus)
    {
        Name = name;
        _qemu = qemu;
        _memory = memory;
        _host = host;
        State = state;
        VcpuCount = vcpus;
        // Chosen when first asked for (an arrived VM needs one only to leave again: not in its switch-over).
        _dirtyLog = new(() =>
        {
            var log = QemuDirtyLogChoice.Choose(qemu, memory, qemu.DirtyLogKind, () => _qemu.ExitReason is { } gone ? $"QEMU (pid {_qemu.Pid}) of VM {Name} {gone}" : null, out string? note);
            DirtyLogNote = note;
            return log;
        });
    }

    /// <summary>Starts a QEMU guest from <paramref name="spec"/> on this host, running, its RAM in a new shared file.</summary>
    public static QemuVm Start(string name, QemuVmSpec spec, QemuHostOptions? host = null)
    {
        host ??= new QemuHostOptions();
        var qemu = QemuProcess.Start(spec, host, name, incoming: false);
        try
        {
            var memory = GuestMemory.Open(qemu.RamFile, spec.MemoryBytes);
            return new QemuVm(name, qemu, memory, host, VmRunState.Running, CountVcpus(qemu));
        }
        catch
        {
            qemu.Dispose();
            throw;
        }
    }

    internal static int CountVcpus(QemuProcess qemu) => qemu.Qmp.Execute("query-cpus-fast") is JsonArray cpus ? cpus.Count : throw new QmpException("QEMU's query-cpus-fast did not return a list");

    public string Name { get; }
    public string Kind => KindName;
    public int VcpuCount { get; }
    public string Spec => _qemu.Spec.ToJson();
    public string Description => $"qemu {_qemu.Spec.Machine}/{_qemu.Spec.Accel}, " + (_qemu.Spec.Kernel is { } k ? $"kernel {Path.GetFileName(k)}" : $"boot image {Path.GetFileName(_qemu.Spec.BootImage)}");
    public VmBrakes Brakes => VmBrakes.None;
    public GuestMemory Memory => _memory ?? throw new ObjectDisposedException(nameof(QemuVm));
    public IDirtyLog DirtyLog => _dirtyLog.Value;
    /// <summary>Why the dirty log is not the agent's, when it could not be (null otherwise, or before <see cref="DirtyLog"/> was chosen).</summary>
    public string? DirtyLogNote { get; private set; }
    public VmRunState State { get; private set; }
    public long StateSizeHint => 512 << 10;

    /// <summary>The QEMU process (pid, run directory, serial log).</summary>
    public QemuProcess Process => _qemu;
    public string SerialLog => _qemu.SerialLog;

    /// <summary>With <see cref="QemuHostOptions.HashRamAtSwitchover"/>: the RAM file's hash when its state was saved (paused).</summary>
    public ulong? RamHashAtPause { get; private set; }
    /// <summary>With <see cref="QemuHostOptions.HashRamAtSwitchover"/>, at a destination: the RAM file's hash right before QEMU loaded the device state.</summary>
    public ulong? RamHashBeforeDeviceLoad { get; internal set; }

    /// <summary>The arrival this VM was restored for (destination), so that an undone restore can start over.</summary>
    internal IncomingVm? Arrival { get; init; }

    /// <summary>
    /// Pauses by beginning QEMU's device-state migration (<see cref="QemuDeviceStateSave"/>): QEMU
    /// does its save set-up while the guest runs, then stops it and waits in pre-switchover, so
    /// <see cref="SaveState"/> in the pause only lets it write the state. Where QEMU ends that
    /// migration otherwise, a plain <c>stop</c>.
    /// </summary>
    public void Pause()
    {
        if (State == VmRunState.Paused) return;
        _save = BeginSave();
        if (_save is null) Run("stop");
        State = VmRunState.Paused;
    }

    private QemuDeviceStateSave? _save;

    private QemuDeviceStateSave? BeginSave()
    {
        string path = Path.Combine(_qemu.RunDirectory, $"state-out-{++_stateSaves}.sock");
        try { return QemuDeviceStateSave.BeginPaused(_qemu, path, _host.DeviceStateTimeout); }
        catch (QmpException e) when (e is not QmpError && _qemu.ExitReason is { } gone) { throw new QmpException($"QEMU (pid {_qemu.Pid}) of VM {Name} {gone}: pausing failed", e); }
    }

    public void Resume()
    {
        // Paused before the state was saved: QEMU's cancelled migration restarts the guest itself.
        if (_save is { } save)
        {
            _save = null;
            using (save) save.Cancel();
        }
        if (!IsRunning()) Run("cont");
        State = VmRunState.Running;
        _savedState = null; // it runs again: its device state moves on
    }

    private bool IsRunning() => Run("query-status") is JsonObject o && o["running"]?.GetValue<bool>() == true;

    /// <summary>After a completed switch-over: QEMU quits (it runs elsewhere now); the RAM file stays mapped until Dispose.</summary>
    public void Stop()
    {
        State = VmRunState.Stopped;
        try { _qemu.Qmp.Execute("quit", timeout: TimeSpan.FromSeconds(2)); } catch (QmpException) { } // it may close the socket before answering
        _qemu.Kill();
    }

    /// <summary>
    /// QEMU's device and vCPU state: <c>migrate</c> to a Unix socket in the VM's run directory that
    /// this method listens on, read to the end, and QEMU's own verdict (<c>query-migrate</c>).
    /// Paused only. QEMU is left in its "postmigrate" state, from which <see cref="Resume"/> goes on.
    /// </summary>
    public byte[] SaveState()
    {
        if (State != VmRunState.Paused) throw new InvalidOperationException("SaveState: the VM must be paused");
        // Paused since it was saved (e.g. a post-copy source starting over from its paused VM): the same state.
        if (_savedState is { } saved) return saved;
        if (_host.HashRamAtSwitchover) RamHashAtPause = Memory.ComputeHash();
        // Paused by a plain stop: QEMU's migration from a stopped guest waits in pre-switchover too.
        var save = _save ?? BeginSave() ?? throw new QmpException($"QEMU's device-state migration of VM {Name} did not reach pre-switchover{Gone()}");
        _save = null;
        using (save) return _savedState = save.Finish();
    }

    private string Gone() => _qemu.ExitReason is { } gone ? $" (QEMU {gone})" : "";

    /// <summary>A QMP command whose failure names how QEMU ended, if it did.</summary>
    private JsonNode? Run(string command, JsonObject? args = null)
    {
        try { return _qemu.Qmp.Execute(command, args); }
        catch (QmpException e) when (e is not QmpError && _qemu.ExitReason is { } gone) { throw new QmpException($"QEMU (pid {_qemu.Pid}) of VM {Name} {gone}: '{command}' failed", e); }
    }

    /// <summary>The pause's QMP path (QEMU's paused migration, its events) compiled before the pause.</summary>
    public void WarmSwitchover()
    {
        // The pending set's count in the pause was compiled there (FullOpts) even from the ReadyToRun build.
        _ = new PageBitmap(64).Count();
        Engine.SwitchoverWarmup.Prepare(typeof(QemuDeviceStateSave));
        Engine.SwitchoverWarmup.Prepare(typeof(QmpClient));
    }

    public void Throttle(double fraction)
    {
        if (fraction > 0) throw new NotSupportedException(NoBrakes);
    }

    public double ThrottleFraction => 0;

    public void LimitDirtyRate(double pagesPerSecondPerVcpu)
    {
        if (pagesPerSecondPerVcpu > 0) throw new NotSupportedException(NoBrakes);
    }

    public double DirtyRateLimit => 0;

    /// <summary>The boot-sector guest's own verdict from its serial log: null while it found no stale or lost page (or it is another guest).</summary>
    public string? CheckInvariant()
    {
        string log = BootSectorSerial.Read(SerialLog);
        // The banner is printed once, at boot: a boot-sector guest that arrived here by migration
        // reports on this QEMU's serial log without it.
        bool bootSector = BootSectorSerial.IsBootSector(log) || (_qemu.Incoming && _qemu.Spec.BootImage is not null);
        if (!bootSector || BootSectorSerial.Last(log) is not { } last) return null;
        return last.Errors == 0 ? null : $"the boot-sector guest found {last.Errors} stale or lost pages (after {last.Passes} passes)";
    }

    /// <summary>Hands the RAM mapping back (an undone restore) and ends this QEMU, keeping its RAM file.</summary>
    internal (GuestMemory Memory, QemuProcess Qemu) Detach()
    {
        var memory = _memory ?? throw new ObjectDisposedException(nameof(QemuVm));
        _memory = null;
        _qemu.OwnsRamFile = false;
        return (memory, _qemu);
    }

    public void Dispose()
    {
        _save?.Dispose();
        _save = null;
        if (_dirtyLog.IsValueCreated) _dirtyLog.Value.Dispose();
        _qemu.Dispose();
        _memory?.Dispose();
        _memory = null;
    }
}
