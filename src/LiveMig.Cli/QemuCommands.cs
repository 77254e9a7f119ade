using LiveMig.Protocol;
using System.CommandLine;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Qemu;

namespace LiveMig.Cli;

/// <summary>
/// The command line's QEMU guests: <c>migrate --qemu IMAGE</c> and <c>demo --qemu IMAGE</c> start
/// one here; <c>listen --qemu-allow DIR</c> lets an agent receive them. What a QEMU guest cannot
/// do yet is refused here in one line (exit 2), before QEMU starts.
/// </summary>
internal static class QemuCommands
{
    /// <summary>The guest's description from --qemu or --qemu-kernel (with --qemu-initrd, --qemu-append), --qemu-forward, --qemu-accel, --memory and --vcpus, or null without either; refuses what does not go with it.</summary>
    public static QemuVmSpec? Spec(CliOptions o, ParseResult r, MigrationOptions options)
    {
        string? image = r.GetValue(o.Qemu), kernel = r.GetValue(o.QemuKernel);
        bool Given(Option opt) => r.GetResult(opt) is { Implicit: false };
        if (image is null && kernel is null)
        {
            foreach (var opt in new Option[] { o.QemuAccel, o.QemuInitrd, o.QemuAppend, o.QemuForward })
                if (Given(opt)) throw new UsageException($"{opt.Name}: only with --qemu IMAGE or --qemu-kernel KERNEL");
            return null;
        }
        if (image is not null && kernel is not null) throw new UsageException("--qemu and --qemu-kernel: give one (a boot image or a kernel)");
        if (image is not null && (Given(o.QemuInitrd) || Given(o.QemuAppend))) throw new UsageException($"{(Given(o.QemuInitrd) ? "--qemu-initrd" : "--qemu-append")}: only with --qemu-kernel");
        foreach (var opt in o.BuiltInVmOptions)
            if (Given(opt)) throw new UsageException($"{opt.Name}: not with --qemu: it is the built-in VM's (a QEMU guest runs its image; its writes are found by page hashes)");
        Refuse(o, r, options);
        string memText = r.GetValue(o.Memory)!;
        if (!Units.TryParseBytes(memText, out long memory)) throw new UsageException($"--memory '{memText}': expected a size such as 128MiB");
        var forward = Ports(r.GetValue(o.QemuForward));
        var spec = new QemuVmSpec
        {
            MemoryBytes = memory, Vcpus = r.GetValue(o.Vcpus), Accel = r.GetValue(o.QemuAccel)!.ToLowerInvariant(),
            BootImage = Existing("--qemu", image, "guests/bootsector/build.sh builds the boot-sector guest"),
            Kernel = Existing("--qemu-kernel", kernel, "guests/linux/build.sh builds the Linux guest"),
            Initrd = Existing("--qemu-initrd", r.GetValue(o.QemuInitrd), "guests/linux/build.sh builds the Linux guest"),
            Append = kernel is null ? null : r.GetValue(o.QemuAppend),
            Network = forward.Count > 0 ? "user" : "none", Forward = forward,
        };
        if (spec.Error(kernel is null ? "--qemu" : "--qemu-kernel") is { } why) throw new UsageException(why);
        if (memory > MachineMemory.TotalBytes) throw new UsageException($"--memory {memText}: larger than this machine's memory");
        return spec;
    }

    private static string? Existing(string option, string? file, string hint)
    {
        if (file is null) return null;
        string path = Path.GetFullPath(file);
        return File.Exists(path) ? path : throw new UsageException($"{option} {PeerText.Escape(file)}: no such file ({hint})");
    }

    /// <summary>--qemu-forward's guest ports: comma-separated numbers (the description checks their range).</summary>
    private static List<int> Ports(string? text)
    {
        if (text is null) return [];
        var ports = new List<int>();
        foreach (string p in text.Split(',', StringSplitOptions.TrimEntries))
            ports.Add(int.TryParse(p, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int port)
                ? port : throw new UsageException($"--qemu-forward '{PeerText.Escape(text)}': expected guest TCP ports separated by commas, e.g. 6379"));
        return ports;
    }

    /// <summary>"guest port 6379 at 127.0.0.1:40123, …" for a QEMU guest with forwards, else null.</summary>
    public static string? Forwards(QemuProcess q) =>
        q.ForwardedPorts.Count == 0 ? null : string.Join(", ", q.ForwardedPorts.OrderBy(f => f.Key).Select(f => $"guest port {f.Key} at 127.0.0.1:{f.Value}"));

    /// <summary>What a QEMU guest cannot do (yet): brakes (none under QEMU that LiveMig can apply), another demand paging than QEMU's own faults.</summary>
    private static void Refuse(CliOptions o, ParseResult r, MigrationOptions options)
    {
        if (r.GetResult(o.DemandPaging) is { Implicit: false }) throw new UsageException($"--demand-paging: not with --qemu: {QemuVm.DemandPagingIsQemus}");
        if (options.PreCopy.OnStall == StallAction.Throttle) throw new UsageException($"--on-stall throttle: not with --qemu: {QemuVm.NoBrakes}");
        if (options.PreCopy.AutoConverge is not null) throw new UsageException($"--auto-converge: not with --qemu: {QemuVm.NoBrakes}");
        if (options.PreCopy.DirtyLimit > 0) throw new UsageException($"--dirty-limit: not with --qemu: {QemuVm.NoBrakes}");
    }

    /// <summary>Starts the guest and lets it run for the warm-up; says where its serial log is.</summary>
    public static QemuVm Start(string name, QemuVmSpec spec, TimeSpan warmup, bool quiet)
    {
        QemuVm vm;
        try { vm = QemuVm.Start(name, spec); }
        catch (QmpException e) { throw new UsageException(spec.BootImage is { } image ? $"--qemu {image}: {e.Message}" : $"--qemu-kernel {spec.Kernel}: {e.Message}"); }
        string log = vm.DirtyLog.Name; // chosen now: the agent in QEMU, or page hashes (the note says why)
        if (vm.DirtyLogNote is { } note) Console.Error.WriteLine($"livemig: note: {note}");
        if (!quiet) Console.Error.WriteLine($"VM {name}: QEMU pid {vm.Process.Pid} ({spec.Machine}/{spec.Accel}), {Units.Bytes(spec.MemoryBytes)}, {vm.VcpuCount} vCPUs, RAM file {vm.Process.RamFile}, serial log {vm.SerialLog}, dirty log {log}; warming up {warmup.TotalSeconds:0.#} s");
        if (!quiet && Forwards(vm.Process) is { } forwards) Console.Error.WriteLine($"VM {name}: {forwards} (this host's choice; the destination picks its own)");
        Thread.Sleep(warmup);
        return vm;
    }

    /// <summary>The destination's factories with --qemu-allow: the built-in VM's and, for those directories, QEMU guests'.</summary>
    public static IReadOnlyList<Vm.IVmFactory> Factories(string[]? allow)
    {
        var dirs = allow?.SelectMany(a => a.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)).ToArray() ?? [];
        if (dirs.Length == 0) return Vm.IVmFactory.Defaults;
        foreach (string d in dirs)
            if (!Directory.Exists(d)) throw new UsageException($"--qemu-allow {PeerText.Escape(d)}: no such directory");
        return [Vm.BuiltInVmFactory.Instance, new QemuVmFactory(new QemuHostOptions { AllowedImageDirectories = [.. dirs.Select(Path.GetFullPath)] })];
    }
}
