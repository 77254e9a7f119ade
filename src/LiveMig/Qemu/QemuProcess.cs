using System.ComponentModel;
using System.Diagnostics;
using System.Text.Json.Nodes;

namespace LiveMig.Qemu;

/// <summary>
/// One QEMU process LiveMig started for a guest: its private run directory (QMP socket, serial
/// log, device-state sockets), its RAM file, its QMP connection, and how it ended. Started
/// ready for migration: capability <c>x-ignore-shared</c> is set, so QEMU's own migration stream
/// carries device and vCPU state only (the RAM lives in the shared file LiveMig moves).
/// Dispose kills it and removes its files (the RAM file only when this process made it).
/// </summary>
public sealed class QemuProcess : IDisposable
{
    private readonly Process _process;
    private readonly Queue<string> _stderrTail = new();
    private const int StderrLines = 8;
    private int _disposed;

    private QemuProcess(Process process, QemuVmSpec spec, string runDirectory, string ramFile, bool ownsRamFile, bool incoming)
    {
        _process = process;
        Spec = spec;
        RunDirectory = runDirectory;
        RamFile = ramFile;
        OwnsRamFile = ownsRamFile;
        Incoming = incoming;
        Pid = process.Id;
    }

    public QemuVmSpec Spec { get; }
    public string RunDirectory { get; }
    public string RamFile { get; }
    /// <summary>Whether this process made <see cref="RamFile"/> (and so deletes it on Dispose).</summary>
    public bool OwnsRamFile { get; set; }
    /// <summary>Started with <c>-incoming defer -S</c>: waiting for its device state.</summary>
    public bool Incoming { get; }
    public int Pid { get; }
    public QmpClient Qmp { get; private set; } = null!;
    public string SerialLog => Path.Combine(RunDirectory, "serial.log");
    public string QmpSocket => Path.Combine(RunDirectory, "qmp.sock");
    /// <summary>The dirty-page agent's socket when the agent was preloaded into this QEMU, else null.</summary>
    public string? AgentSocket { get; private init; }
    internal QemuDirtyLog DirtyLogKind { get; private init; }

    /// <summary>Guest TCP port → the port of this host's 127.0.0.1 QEMU forwards to it (<see cref="QemuVmSpec.Forward"/>), as QEMU bound them.</summary>
    public IReadOnlyDictionary<int, int> ForwardedPorts { get; private set; } = new Dictionary<int, int>();

    /// <summary>The forwards QEMU listens on, from <c>info usernet</c> (the only place QEMU says which port the kernel picked for a port 0).</summary>
    private Dictionary<int, int> ReadForwards()
    {
        string text = Qmp.Execute("human-monitor-command", new JsonObject { ["command-line"] = "info usernet" })?.GetValue<string>() ?? "";
        var ports = UserNetForwards(text);
        foreach (int guest in Spec.Forward)
            if (!ports.ContainsKey(guest)) throw new QmpException($"QEMU does not list a forward to guest port {guest} in 'info usernet'");
        return ports;
    }

    /// <summary>Parses <c>info usernet</c>: its <c>TCP[HOST_FORWARD]  FD  127.0.0.1 HOSTPORT  10.0.2.15 GUESTPORT ...</c> lines.</summary>
    internal static Dictionary<int, int> UserNetForwards(string text)
    {
        var ports = new Dictionary<int, int>();
        foreach (string line in text.Split('\n'))
        {
            string[] f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            if (f.Length >= 6 && f[0] == "TCP[HOST_FORWARD]" && int.TryParse(f[3], out int host) && int.TryParse(f[5], out int guest)) ports[guest] = host;
        }
        return ports;
    }

    /// <summary>Null while QEMU runs; how it ended otherwise (exit code or signal, and its last line on stderr).</summary>
    public string? ExitReason
    {
        get
        {
            if (Volatile.Read(ref _disposed) != 0) return "was stopped by LiveMig";
            if (!_process.HasExited) return null;
            int code = _process.ExitCode;
            string how = code > 128 ? $"was killed by signal {code - 128}" : $"exited with code {code}";
            string? last;
            lock (_stderrTail) last = _stderrTail.LastOrDefault();
            return last is null ? how : $"{how} ({last})";
        }
    }

    /// <summary>Waits (bounded) for QEMU to end, e.g. once its address space is known gone; whether it has.</summary>
    public bool WaitForExit(TimeSpan timeout) => Volatile.Read(ref _disposed) != 0 || _process.WaitForExit(timeout);

    /// <summary>Starts QEMU for <paramref name="spec"/>: a new RAM file (or <paramref name="ramFile"/>, which stays the caller's), QMP connected, x-ignore-shared set.</summary>
    public static QemuProcess Start(QemuVmSpec spec, QemuHostOptions host, string name, bool incoming, string? ramFile = null)
    {
        if (!OperatingSystem.IsLinux()) throw new PlatformNotSupportedException("QEMU guests need Linux (shared RAM files, Unix sockets)");
        if (spec.Error() is { } bad) throw new QmpException(bad);
        string tag = $"{Sanitize(name)}-{Guid.NewGuid().ToString("N")[..8]}";
        string runDir = Path.Combine(host.RunDirectory, tag);
        bool ownsRam = ramFile is null;
        ramFile ??= Path.Combine(host.RamDirectory, $"livemig-qemu-{tag}.ram");
        try
        {
            Directory.CreateDirectory(host.RunDirectory);
            Directory.CreateDirectory(runDir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
            if (ownsRam) CreateRamFile(ramFile, spec.MemoryBytes);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            TryDelete(runDir, ownsRam ? ramFile : null);
            throw new QmpException($"cannot prepare the files of QEMU guest {name}: {e.Message}", e);
        }
        var psi = new ProcessStartInfo(host.Binary)
        {
            RedirectStandardError = true, RedirectStandardOutput = true, RedirectStandardInput = true, UseShellExecute = false,
        };
        foreach (string a in QemuCommandLine.Build(spec, ramFile, Path.Combine(runDir, "qmp.sock"), Path.Combine(runDir, "serial.log"), incoming, host.ForwardHostPorts)) psi.ArgumentList.Add(a);
        string? agentSocket = null;
        // A destination preloads the agent whatever the dirty log: post-copy's demand paging needs it.
        if ((host.DirtyLog != QemuDirtyLog.PageHash || incoming) && File.Exists(host.AgentLibrary))
        {
            // The agent (native/qemu_dirty_agent.c) runs inside QEMU: it alone sees QEMU's writes through QEMU's mapping, and registers it for post-copy's faults.
            agentSocket = Path.Combine(runDir, "dirty.sock");
            string? preload = Environment.GetEnvironmentVariable("LD_PRELOAD");
            psi.Environment["LD_PRELOAD"] = string.IsNullOrEmpty(preload) ? host.AgentLibrary : $"{host.AgentLibrary}:{preload}";
            psi.Environment["LIVEMIG_AGENT_SOCKET"] = agentSocket;
            psi.Environment["LIVEMIG_AGENT_RAM"] = ramFile;
        }
        Process process;
        try { process = Process.Start(psi) ?? throw new Win32Exception("Process.Start returned nothing"); }
        catch (Win32Exception e)
        {
            TryDelete(runDir, ownsRam ? ramFile : null);
            throw new QmpException($"QEMU not found: cannot run '{host.Binary}' ({e.Message}); scripts/install-qemu.sh installs qemu-system-x86", e);
        }
        var q = new QemuProcess(process, spec, runDir, ramFile, ownsRam, incoming) { AgentSocket = agentSocket, DirtyLogKind = host.DirtyLog };
        process.ErrorDataReceived += (_, e) => q.NoteStderr(e.Data);
        process.OutputDataReceived += (_, _) => { };
        process.BeginErrorReadLine();
        process.BeginOutputReadLine();
        try
        {
            q.Qmp = QmpClient.ConnectAsync(q.QmpSocket, host.StartTimeout, () => q.ExitReason).GetAwaiter().GetResult();
            q.Qmp.Execute("migrate-set-capabilities", new JsonObject
            {
                // pause-before-switchover and events: LiveMig's pause is QEMU's own stop at the end of
                // its save set-up (QemuDeviceStateSave), learnt from MIGRATION events.
                ["capabilities"] = new JsonArray(
                    new JsonObject { ["capability"] = "x-ignore-shared", ["state"] = true },
                    new JsonObject { ["capability"] = "pause-before-switchover", ["state"] = true },
                    new JsonObject { ["capability"] = "events", ["state"] = true }),
            });
            // QEMU caps its migration at 128 MiB/s by default: the device state LiveMig carries goes as fast as it can.
            q.Qmp.Execute("migrate-set-parameters", new JsonObject { ["max-bandwidth"] = 1L << 40 });
            q.ForwardedPorts = spec.Forward.Count == 0 ? new Dictionary<int, int>() : q.ReadForwards();
            return q;
        }
        catch (QmpException e)
        {
            string why = q.Explain(e);
            q.Dispose();
            throw new QmpException($"QEMU for guest {name} did not start: {why}", e);
        }
    }

    private static void CreateRamFile(string path, long size)
    {
        if (!OperatingSystem.IsLinux()) throw new PlatformNotSupportedException("QEMU guests need Linux");
        using var f = new FileStream(path, new FileStreamOptions
        {
            Mode = FileMode.CreateNew, Access = FileAccess.ReadWrite, UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite,
        });
        f.SetLength(size); // sparse: pages cost nothing until the guest (or LiveMig) writes them
    }

    private static string Sanitize(string name)
    {
        var s = new string([.. name.Take(32).Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' ? c : '_')]);
        return s.Length == 0 ? "vm" : s;
    }

    private void NoteStderr(string? line)
    {
        if (string.IsNullOrWhiteSpace(line)) return;
        lock (_stderrTail)
        {
            _stderrTail.Enqueue(line.Length > 300 ? line[..300] : line);
            while (_stderrTail.Count > StderrLines) _stderrTail.Dequeue();
        }
    }

    /// <summary>A one-line failure for <paramref name="e"/>, naming how QEMU ended when it has.</summary>
    public string Explain(Exception e) => ExitReason is { } gone ? $"QEMU (pid {Pid}) {gone}" : e.Message;

    /// <summary>Ends QEMU at once (SIGKILL) and waits for it, bounded.</summary>
    public void Kill()
    {
        try
        {
            if (!_process.HasExited) _process.Kill();
            _process.WaitForExit(5000);
        }
        catch (InvalidOperationException) { }
        catch (Win32Exception) { }
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        Qmp?.Dispose();
        Kill();
        _process.Dispose();
        TryDelete(RunDirectory, OwnsRamFile ? RamFile : null);
    }

    private static void TryDelete(string runDir, string? ramFile)
    {
        try { if (Directory.Exists(runDir)) Directory.Delete(runDir, recursive: true); } catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        try { if (ramFile is not null) File.Delete(ramFile); } catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }
}
