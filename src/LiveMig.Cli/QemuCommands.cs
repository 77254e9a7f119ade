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
    /// <summary>The guest's description from --qemu, --qemu-accel, --memory and --vcpus, or null without --qemu; refuses what does not go with it.</summary>
    public static QemuVmSpec? Spec(CliOptions o, ParseResult r, MigrationOptions options)
    {
        if (r.GetValue(o.Qemu) is not { } image)
        {
            if (r.GetResult(o.QemuAccel) is { Implicit: false }) throw new UsageException("--qemu-accel: only with --qemu IMAGE");
            return null;
        }
        foreach (var opt in o.BuiltInVmOptions)
            if (r.GetResult(opt) is { Implicit: false }) throw new UsageException($"{opt.Name}: not with --qemu: it is the built-in VM's (a QEMU guest runs its image; its writes are found by page hashes)");
        Refuse(o, r, options);
        string path = Path.GetFullPath(image);
        if (!File.Exists(path)) throw new UsageException($"--qemu {PeerText.Escape(image)}: no such file (guests/bootsector/build.sh builds the boot-sector guest)");
        string memText = r.GetValue(o.Memory)!;
        if (!Units.TryParseBytes(memText, out long memory)) throw new UsageException($"--memory '{memText}': expected a size such as 128MiB");
        var spec = new QemuVmSpec { MemoryBytes = memory, Vcpus = r.GetValue(o.Vcpus), Accel = r.GetValue(o.QemuAccel)!.ToLowerInvariant(), BootImage = path };
        if (spec.Error("--qemu") is { } why) throw new UsageException(why);
        if (memory > MachineMemory.TotalBytes) throw new UsageException($"--memory {memText}: larger than this machine's memory");
        return spec;
    }

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
        catch (QmpException e) { throw new UsageException($"--qemu {spec.BootImage}: {e.Message}"); }
        string log = vm.DirtyLog.Name; // chosen now: the agent in QEMU, or page hashes (the note says why)
        if (vm.DirtyLogNote is { } note) Console.Error.WriteLine($"livemig: note: {note}");
        if (!quiet) Console.Error.WriteLine($"VM {name}: QEMU pid {vm.Process.Pid} ({spec.Machine}/{spec.Accel}), {Units.Bytes(spec.MemoryBytes)}, {vm.VcpuCount} vCPUs, RAM file {vm.Process.RamFile}, serial log {vm.SerialLog}, dirty log {log}; warming up {warmup.TotalSeconds:0.#} s");
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
