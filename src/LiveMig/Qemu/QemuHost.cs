using LiveMig.Linux;

namespace LiveMig.Qemu;

/// <summary>How this host runs QEMU guests: the binary, where their files go, and (as a destination) which boot images it lets a source name.</summary>
public sealed record QemuHostOptions
{
    /// <summary>The QEMU binary, a name looked up on PATH or a path (scripts/install-qemu.sh installs Debian's).</summary>
    public string Binary { get; init; } = "qemu-system-x86_64";

    /// <summary>Each guest gets a private directory (mode 0700) under this one: its QMP socket, its serial log, the device-state sockets.</summary>
    public string RunDirectory { get; init; } = Path.Combine(Path.GetTempPath(), "livemig-qemu");

    /// <summary>Where guest RAM files are made (tmpfs: QEMU's memory-backend-file and LiveMig map the same pages).</summary>
    public string RamDirectory { get; init; } = "/dev/shm";

    /// <summary>
    /// Directories a source's description may name boot images in (a destination refuses any other
    /// path, after resolving symbolic links); empty refuses every QEMU guest. A source starting its
    /// own guest does not check this.
    /// </summary>
    public IReadOnlyList<string> AllowedImageDirectories { get; init; } = [];

    /// <summary>How a guest's writes are found (<see cref="QemuDirtyLog"/>): by default the agent preloaded into QEMU where it works, else page hashes.</summary>
    public QemuDirtyLog DirtyLog { get; init; } = QemuDirtyLog.Auto;

    /// <summary>The dirty-page agent preloaded into QEMU (native/qemu_dirty_agent.c, built next to LiveMig's assemblies when gcc is there).</summary>
    public string AgentLibrary { get; init; } = Path.Combine(AppContext.BaseDirectory, "liblivemig_qemu_agent.so");

    /// <summary>
    /// The port of this host's loopback (127.0.0.1) each forwarded guest port of a description
    /// (<see cref="QemuVmSpec.Forward"/>) listens on; a guest port not listed, or listed as 0,
    /// gets a free port the kernel picks (<see cref="QemuProcess.ForwardedPorts"/> says which).
    /// The host's choice, never the description's: a destination opens only ports it chose.
    /// </summary>
    public IReadOnlyDictionary<int, int> ForwardHostPorts { get; init; } = new Dictionary<int, int>();

    /// <summary>How long QEMU may take to start and answer on QMP.</summary>
    public TimeSpan StartTimeout { get; init; } = TimeSpan.FromSeconds(15);

    /// <summary>How long QEMU may take to save or load its device state (about 0.3 MB; milliseconds normally).</summary>
    public TimeSpan DeviceStateTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Destination: hash the RAM file from scratch right before QEMU loads the device state (which
    /// may write guest RAM, e.g. KVM's TPR patch) and keep it on the VM (<see cref="QemuVm.RamHashBeforeDeviceLoad"/>);
    /// source: hash it when paused for the switch-over (<see cref="QemuVm.RamHashAtPause"/>). For
    /// tests and diagnosis: it costs a pass over the guest's memory inside the downtime.
    /// </summary>
    public bool HashRamAtSwitchover { get; init; }

    /// <summary>Why this destination will not start <paramref name="spec"/>, or null: its boot image must resolve to a regular file inside an allowed directory.</summary>
    public string? Refusal(QemuVmSpec spec)
    {
        if (spec.Error() is { } bad) return bad;
        if (AllowedImageDirectories.Count == 0) return "this destination runs no QEMU guests (give it directories for their images: livemig listen --qemu-allow DIR)";
        foreach (string file in spec.Files)
            if (FileRefusal(file) is { } why) return why;
        return null;
    }

    private string? FileRefusal(string file)
    {
        string? real = Native.RealPath(file);
        if (real is null || !File.Exists(real)) return $"boot file {file} does not exist here";
        foreach (string dir in AllowedImageDirectories)
        {
            string? allowed = Native.RealPath(dir);
            if (allowed is not null && real.StartsWith(allowed.TrimEnd('/') + "/", StringComparison.Ordinal)) return null;
        }
        return $"boot file {file} is outside the directories this destination allows ({string.Join(", ", AllowedImageDirectories)})";
    }
}

/// <summary>
/// QEMU's command line for a <see cref="QemuVmSpec"/>, built the same way on both sides: no
/// default devices, guest RAM in a shared file (so LiveMig maps the pages QEMU runs on), the boot
/// image as a read-only floppy or a kernel and initramfs QEMU loads, user networking if asked
/// (with the description's guest ports forwarded from this host's loopback, on ports this host chose),
/// the first serial port into a log file, QMP on a Unix socket, and
/// at a destination <c>-incoming defer -S</c> (the device state comes later, over QMP; the guest
/// runs only when LiveMig says <c>cont</c>). Arguments are passed as a list, never through a shell.
/// </summary>
public static class QemuCommandLine
{
    public static List<string> Build(QemuVmSpec spec, string ramFile, string qmpSocket, string serialLog, bool incoming, IReadOnlyDictionary<int, int>? hostPorts = null)
    {
        foreach (string p in new[] { ramFile, qmpSocket, serialLog })
            if (QemuVmSpec.PathError(p) is { } bad) throw new ArgumentException($"QEMU file {bad}");
        if (spec.Error() is { } why) throw new ArgumentException(why);
        var a = new List<string>
        {
            "-nodefaults", "-no-user-config",
            "-machine", $"{spec.Machine},memory-backend=ram0",
            "-accel", spec.Accel,
            "-m", $"{spec.MemoryBytes >> 20}M",
            "-smp", spec.Vcpus.ToString(System.Globalization.CultureInfo.InvariantCulture),
            "-object", $"memory-backend-file,id=ram0,size={spec.MemoryBytes},mem-path={ramFile},share=on",
            "-chardev", $"file,id=serial0,path={serialLog}",
            "-serial", "chardev:serial0",
            "-display", "none",
            "-qmp", $"unix:{qmpSocket},server=on,wait=off",
        };
        if (spec.BootImage is not null) a.AddRange(["-drive", $"file={spec.BootImage},format=raw,if=floppy,readonly=on"]);
        if (spec.Kernel is not null) a.AddRange(["-kernel", spec.Kernel]);
        if (spec.Initrd is not null) a.AddRange(["-initrd", spec.Initrd]);
        if (spec.Append is not null) a.AddRange(["-append", spec.Append]);
        if (spec.Network == "user") a.AddRange(["-netdev", UserNetwork(spec, hostPorts), "-device", "virtio-net-pci,netdev=net0"]);
        if (incoming) a.AddRange(["-incoming", "defer", "-S"]);
        return a;
    }

    /// <summary>QEMU user networking, each forwarded guest port from 127.0.0.1 only (port 0: the kernel picks one).</summary>
    private static string UserNetwork(QemuVmSpec spec, IReadOnlyDictionary<int, int>? hostPorts)
    {
        var b = new System.Text.StringBuilder("user,id=net0");
        foreach (int guest in spec.Forward)
        {
            int host = hostPorts is not null && hostPorts.TryGetValue(guest, out int h) ? h : 0;
            if (host is < 0 or > 65535) throw new ArgumentException($"host port {host} for guest port {guest} is out of range (0..65535)");
            b.Append(System.Globalization.CultureInfo.InvariantCulture, $",hostfwd=tcp:127.0.0.1:{host}-:{guest}");
        }
        return b.ToString();
    }
}
