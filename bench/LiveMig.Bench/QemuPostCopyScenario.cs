using System.Text.Json.Nodes;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Qemu;

namespace LiveMig.Bench;

/// <summary>
/// <c>qemu-postcopy</c>: the self-checking boot-sector guest moved by QEMU's own post-copy
/// (<c>postcopy-ram</c>, switched after a few seconds of pre-copy; with <c>postcopy-preempt</c>
/// too where this QEMU has it) and by LiveMig's post-copy and hybrid, at the same bandwidth cap,
/// in one run. Every migration goes through a counting TCP relay, so the bytes are the ones at the
/// socket (QEMU's <c>ram.transferred</c> counts before compression), both directions. Downtime is
/// each system's own figure; the guest's own error count at the destination says whether every
/// page arrived. With <c>--guest linux</c> the redis client of <c>qemu-precopy --guest linux</c>
/// runs through every move instead, and each row gives its longest gap between two replies (the
/// interruption it saw, whatever each system calls its downtime) and the keys read back.
/// One Markdown table on stdout.
/// <code>LiveMig.Bench qemu-postcopy [--guest bootsector|linux] [--image guests/bootsector/out/bootsector.img] [--kernel-dir guests/linux/out] [--memory 128MiB] [--bandwidth 128MiB] [--switch-after 5s] [--reps 1]</code>
/// </summary>
internal static class QemuPostCopyScenario
{
    private sealed record Row(string System, string Outcome, double TotalS, double DowntimeMs, long SocketBytes, long Faults, GuestOutcome Guest, string Notes);

    public static int Run(string[] args)
    {
        string image = "guests/bootsector/out/bootsector.img", kernelDir = "guests/linux/out", kind = "bootsector";
        long? memory = null;
        long bandwidth = 128L << 20;
        var switchAfter = TimeSpan.FromSeconds(5);
        int reps = 1;
        try
        {
            for (int i = 0; i < args.Length; i++)
            {
                string a = args[i];
                string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{a} needs a value");
                switch (a)
                {
                    case "--guest": kind = Next() is "bootsector" or "linux" ? args[i] : throw new ArgumentException("--guest: bootsector or linux"); break;
                    case "--image": image = Next(); break;
                    case "--kernel-dir": kernelDir = Next(); break;
                    case "--memory": if (!Units.TryParseBytes(Next(), out long m) || (memory = m) < 32L << 20) throw new ArgumentException("--memory: a size of 32MiB or more"); break;
                    case "--bandwidth": if (!Units.TryParseRate(Next(), out bandwidth) || bandwidth <= 0) throw new ArgumentException("--bandwidth: a rate, e.g. 128MiB (per second) or 1Gbit"); break;
                    case "--switch-after": if (!Units.TryParseDuration(Next(), out switchAfter)) throw new ArgumentException("--switch-after: a duration, e.g. 5s"); break;
                    case "--reps": if (!int.TryParse(Next(), out reps) || reps < 1) throw new ArgumentException("--reps: a positive whole number"); break;
                    default: throw new ArgumentException($"unknown option {a}");
                }
            }
        }
        catch (ArgumentException e) { Console.Error.WriteLine($"qemu-postcopy: {e.Message}"); return 2; }
        BenchGuest guest;
        if (kind == "bootsector")
        {
            image = Path.GetFullPath(image);
            if (!File.Exists(image)) { Console.Error.WriteLine($"qemu-postcopy: no boot image {image} (guests/bootsector/build.sh builds it; scripts/install-qemu.sh installs QEMU and nasm)"); return 2; }
            guest = new BootSectorBenchGuest(image, memory ?? 128L << 20);
        }
        else
        {
            kernelDir = Path.GetFullPath(kernelDir);
            if (!File.Exists(Path.Combine(kernelDir, "vmlinuz")) || !File.Exists(Path.Combine(kernelDir, "initrd.gz"))) { Console.Error.WriteLine($"qemu-postcopy: no vmlinuz and initrd.gz in {kernelDir} (guests/linux/build.sh builds them)"); return 2; }
            guest = new LinuxBenchGuest(kernelDir, memory ?? 256L << 20);
        }
        bool linux = guest is LinuxBenchGuest;

        var o = Console.Out;
        o.WriteLine("## QEMU post-copy side by side: QEMU's postcopy-ram and LiveMig's post-copy and hybrid");
        o.WriteLine();
        o.WriteLine($"Command: `LiveMig.Bench qemu-postcopy {string.Join(' ', args)}`");
        o.WriteLine();
        o.WriteLine(MachineInfo.Markdown());
        o.WriteLine($"Guest: {guest.Describe}; cap {Units.Bytes(bandwidth)}/s; QEMU switches to post-copy after {switchAfter.TotalSeconds:0.#} s. Load average at start: {MachineInfo.LoadAverage()}.");
        o.WriteLine();
        o.WriteLine("Downtime is each system's own figure: QEMU's ends when the device state is sent, LiveMig's when the destination runs." + (linux ? " The client's longest gap is what the redis client saw, the same measure for both." : ""));
        o.WriteLine();
        o.WriteLine(linux
            ? "| system | outcome | total s | downtime ms | bytes at the socket | faults / page requests | client's longest gap ms | replies | client errors | keys read back | notes |"
            : "| system | outcome | total s | downtime ms | bytes at the socket | faults / page requests | guest errors after | notes |");
        o.WriteLine(linux ? "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|" : "|---|---|---:|---:|---:|---:|---:|---|");
        string? preempt = PreemptCapability(guest.Spec, guest.Host);
        for (int rep = 0; rep < reps; rep++)
        {
            var rows = new List<Row> { Native(guest, bandwidth, switchAfter, null) };
            if (preempt is not null) rows.Add(Native(guest, bandwidth, switchAfter, preempt));
            rows.Add(LiveMig(guest, bandwidth, MigrationStrategy.PostCopy));
            rows.Add(LiveMig(guest, bandwidth, MigrationStrategy.Hybrid));
            foreach (var r in rows) Emit(o, r, linux);
        }
        if (preempt is null) o.WriteLine("\n_This QEMU has no postcopy-preempt capability: that row is left out._");
        o.WriteLine($"\n_Load average at the end: {MachineInfo.LoadAverage()}._");
        return 0;
    }

    private static void Emit(TextWriter o, Row r, bool linux)
    {
        string head = $"| {r.System} | {r.Outcome} | {r.TotalS:0.00} | {r.DowntimeMs:0.0} | {Units.Bytes(r.SocketBytes)} | {r.Faults:N0} |";
        o.WriteLine(head + QemuBench.GuestCells(r.Guest, r.Notes, linux));
    }

    /// <summary>The name of QEMU's post-copy preemption capability, if this QEMU has one.</summary>
    private static string? PreemptCapability(QemuVmSpec spec, QemuHostOptions host)
    {
        using var probe = QemuProcess.Start(spec, host, "probe", incoming: true);
        var caps = probe.Qmp.Execute("query-migrate-capabilities") as JsonArray ?? [];
        return caps.Select(c => c?["capability"]?.GetValue<string>()).FirstOrDefault(n => n is "postcopy-preempt" or "x-postcopy-preempt");
    }

    /// <summary>QEMU's own migration: pre-copy at the cap, <c>migrate-start-postcopy</c> after <paramref name="switchAfter"/>, through the relay.</summary>
    private static Row Native(BenchGuest guest, long bandwidth, TimeSpan switchAfter, string? preempt)
    {
        string name = preempt is null ? "QEMU postcopy-ram" : $"QEMU postcopy-ram + {preempt}";
        Console.Error.WriteLine($"qemu-postcopy: {name}");
        List<(string, bool)> caps = [("postcopy-ram", true)];
        if (preempt is not null) caps.Add((preempt, true));
        var settings = new NativeSettings(name, caps, new JsonObject { ["max-bandwidth"] = bandwidth, ["max-postcopy-bandwidth"] = bandwidth },
            GiveUp: TimeSpan.FromMinutes(3), SwitchToPostCopyAfter: switchAfter);
        var r = QemuBench.RunNative(guest, settings);
        if (r.GaveUp) return new Row(name, "timed out (3 min) before the switch", r.Elapsed.TotalSeconds, 0, r.SocketBytes, 0, r.Guest, "");
        return new Row(name, r.Status, r.TotalS, r.DowntimeMs, r.SocketBytes, r.Ram?["postcopy-requests"]?.GetValue<long>() ?? 0, r.Guest,
            $"ram.transferred {Units.Bytes(r.Transferred)}; faults column: QEMU's postcopy-requests");
    }

    /// <summary>LiveMig's post-copy or hybrid (two rounds) of the same guest to an agent in this process, both connections through the relay.</summary>
    private static Row LiveMig(BenchGuest guest, long bandwidth, MigrationStrategy strategy)
    {
        string name = $"LiveMig {Migrations.Name(strategy)}";
        Console.Error.WriteLine($"qemu-postcopy: {name}");
        var options = new MigrationOptions { Strategy = strategy, BandwidthLimit = bandwidth, PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 2 } } };
        var r = QemuBench.RunLiveMig(guest, options);
        if (r.Failure is not null) return new Row(name, "failed: " + r.Failure, 0, 0, r.SocketBytes, 0, r.Guest, "");
        var report = r.Report;
        return new Row(name, report.Verified == true ? "completed, verified" : report.Outcome, report.TotalTimeMs / 1000.0, report.DowntimeMs, r.SocketBytes, report.Faults, r.Guest,
            $"pushed {report.PagesPushed:N0}, requested {report.PagesRequested:N0}; fault p50/p99 {report.FaultLatencyUs?.P50:0} / {report.FaultLatencyUs?.P99:0} µs; time to resume {report.TimeToResumeMs / 1000:0.00} s");
    }
}
