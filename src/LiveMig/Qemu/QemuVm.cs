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

    public void Pause()
    {
        if (State == VmRunState.Paused) return;
        Run("stop");
        State = VmRunState.Paused;
    }

    public void Resume()
    {
        Run("cont");
        State = VmRunState.Running;
        _savedState = null; // it runs again: its device state moves on
    }

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
        string path = Path.Combine(_qemu.RunDirectory, $"state-out-{++_stateSaves}.sock");
        var deadline = TimeSpan.FromTicks(_host.DeviceStateTimeout.Ticks);
        using var cancel = new CancellationTokenSource(deadline);
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            listener.Bind(new UnixDomainSocketEndPoint(path));
            listener.Listen(1);
            Run("migrate", new JsonObject { ["uri"] = "unix:" + path });
            byte[] state;
            using (var connection = listener.AcceptAsync(cancel.Token).AsTask().GetAwaiter().GetResult())
                state = ReadAll(connection, cancel.Token);
            string status = AwaitMigration(cancel.Token, out string? error);
            if (status != "completed") throw new QmpException($"QEMU's device-state migration ended '{status}'{(error is null ? "" : ": " + error)}");
            return _savedState = state;
        }
        catch (OperationCanceledException) { throw new QmpException($"QEMU did not save its device state within {deadline.TotalSeconds:0.#} s{Gone()}"); }
        catch (SocketException e) { throw new QmpException($"QEMU's device state could not be read from {path}: {e.Message}{Gone()}", e); }
        finally { File.Delete(path); }
    }

    private static byte[] ReadAll(Socket connection, CancellationToken cancel)
    {
        var state = new MemoryStream();
        var buffer = new byte[256 << 10];
        while (true)
        {
            int n = connection.ReceiveAsync(buffer, SocketFlags.None, cancel).AsTask().GetAwaiter().GetResult();
            if (n == 0) return state.ToArray();
            state.Write(buffer, 0, n);
            if (state.Length > MaxStateBytes) throw new QmpException($"QEMU's device state exceeds {MaxStateBytes >> 20} MiB");
        }
    }

    /// <summary>Polls <c>query-migrate</c> until QEMU's migration (either direction) is over; its status and error.</summary>
    internal string AwaitMigration(CancellationToken cancel, out string? error) => AwaitMigration(_qemu, cancel, out error);

    internal static string AwaitMigration(QemuProcess qemu, CancellationToken cancel, out string? error)
    {
        while (true)
        {
            var info = qemu.Qmp.Execute("query-migrate") as JsonObject;
            string status = info?["status"]?.GetValue<string>() ?? "none";
            error = info?["error-desc"]?.GetValue<string>();
            if (status is "completed" or "failed" or "cancelled") return status;
            cancel.ThrowIfCancellationRequested();
            Thread.Sleep(2);
        }
    }

    private string Gone() => _qemu.ExitReason is { } gone ? $" (QEMU {gone})" : "";

    /// <summary>A QMP command whose failure names how QEMU ended, if it did.</summary>
    private JsonNode? Run(string command, JsonObject? args = null)
    {
        try { return _qemu.Qmp.Execute(command, args); }
        catch (QmpException e) when (e is not QmpError && _qemu.ExitReason is { } gone) { throw new QmpException($"QEMU (pid {_qemu.Pid}) of VM {Name} {gone}: '{command}' failed", e); }
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
        if (_dirtyLog.IsValueCreated) _dirtyLog.Value.Dispose();
        _qemu.Dispose();
        _memory?.Dispose();
        _memory = null;
    }
}
