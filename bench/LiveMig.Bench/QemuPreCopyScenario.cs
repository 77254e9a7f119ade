using System.Text.Json.Nodes;
using LiveMig.Engine;
using LiveMig.Pipeline;
using LiveMig.Policies;

namespace LiveMig.Bench;

/// <summary>
/// <c>qemu-precopy</c>: one guest, one workload, one bandwidth cap, moved by QEMU's own migration
/// (default pre-copy, xbzrle, multifd with zstd, auto-converge, post-copy switched after a few
/// seconds) and by LiveMig (its best configuration, and each stage alone), the systems
/// alternating within each repetition. QEMU gets <c>--give-up</c> to converge, then is cancelled
/// and recorded as "did not converge"; LiveMig's pre-copy rounds get the same budget
/// (<see cref="PreCopyOptions.TimeBudget"/>), after which each configuration does what it says
/// on a stall. Bytes are counted at the socket (<see cref="CountingRelay"/>), both directions.
/// With <c>--guest linux</c> a redis client of ours runs through every move and its longest gap
/// between replies, requests, errors and the keys read back afterwards are reported.
/// <code>LiveMig.Bench qemu-precopy [--guest bootsector|linux] [--image IMG] [--kernel-dir DIR] [--memory 128MiB] [--bandwidth 128MiB] [--give-up 30s] [--switch-after 5s] [--reps 1] [--png FILE] [--systems TEXT,...]</code>
/// </summary>
internal static class QemuPreCopyScenario
{
    internal sealed record Row(string System, string Outcome, bool Completed, double TotalS, double DowntimeMs, long SocketBytes, long Rounds, GuestOutcome Guest, string Notes);

    private sealed record Settings(string GuestKind, string Image, string KernelDir, long Memory, long Bandwidth, TimeSpan GiveUp, TimeSpan SwitchAfter, int Reps, string? Png, string[]? Systems);

    /// <summary>With --systems: only the rows whose name contains one of the given texts (to re-run a few).</summary>
    private static bool Selected(Settings s, string name) => s.Systems is null || s.Systems.Any(t => name.Contains(t, StringComparison.OrdinalIgnoreCase));

    public static int Run(string[] args)
    {
        Settings s;
        try { s = Parse(args); }
        catch (ArgumentException e) { Console.Error.WriteLine($"qemu-precopy: {e.Message}"); return 2; }
        BenchGuest guest;
        if (s.GuestKind == "bootsector")
        {
            if (!File.Exists(s.Image)) { Console.Error.WriteLine($"qemu-precopy: no boot image {s.Image} (guests/bootsector/build.sh builds it; scripts/install-qemu.sh installs QEMU and nasm)"); return 2; }
            guest = new BootSectorBenchGuest(s.Image, s.Memory);
        }
        else
        {
            if (!File.Exists(Path.Combine(s.KernelDir, "vmlinuz")) || !File.Exists(Path.Combine(s.KernelDir, "initrd.gz"))) { Console.Error.WriteLine($"qemu-precopy: no vmlinuz and initrd.gz in {s.KernelDir} (guests/linux/build.sh builds them)"); return 2; }
            guest = new LinuxBenchGuest(s.KernelDir, s.Memory);
        }

        var o = Console.Out;
        string loadAtStart = MachineInfo.LoadAverage();
        o.WriteLine("## QEMU pre-copy side by side: QEMU's own migration and LiveMig's, same guest, workload and cap");
        o.WriteLine();
        o.WriteLine($"Command: `LiveMig.Bench qemu-precopy {string.Join(' ', args)}`");
        o.WriteLine();
        o.WriteLine(MachineInfo.Markdown());
        o.WriteLine($"Guest: {guest.Describe}; cap {Units.Bytes(s.Bandwidth)}/s; downtime target 300 ms on both (QEMU's default); each system gets {s.GiveUp.TotalSeconds:0} s to converge; QEMU's post-copy switches after {s.SwitchAfter.TotalSeconds:0.#} s. Load average at start: {loadAtStart}.");
        o.WriteLine();
        bool linux = guest is LinuxBenchGuest;
        o.WriteLine(linux
            ? "| rep | system | outcome | total s | downtime ms | bytes at the socket | rounds | client's longest gap ms | requests | errors | keys read back | notes |\n|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
            : "| rep | system | outcome | total s | downtime ms | bytes at the socket | rounds | guest errors after | notes |\n|---:|---|---|---:|---:|---:|---:|---:|---|");
        var all = new List<Row>();
        for (int rep = 1; rep <= s.Reps; rep++)
        {
            // QEMU's and LiveMig's configurations alternate, so that a change in the machine's load hits both.
            var natives = NativeConfigurations(s).Where(n => Selected(s, n.Name)).ToList();
            var ours = LiveMigConfigurations(s).Where(c => Selected(s, c.Name)).ToList();
            for (int i = 0; i < Math.Max(natives.Count, ours.Count); i++)
            {
                if (i < natives.Count) Emit(o, rep, Native(guest, natives[i]), linux, all);
                if (i < ours.Count) Emit(o, rep, LiveMig(guest, ours[i].Name, ours[i].Options), linux, all);
            }
        }
        o.WriteLine();
        o.WriteLine("_QEMU's total time starts at its `migrate`; LiveMig's includes its handshake and the destination QEMU's start. Downtime is each system's own figure. Rounds: QEMU's `dirty-sync-count`, LiveMig's rounds (stop-and-copy included). LiveMig's auto-converge and dirty limit are refused for QEMU guests (no brake LiveMig can apply under TCG: docs/qemu.md), so they have no row; free-page skipping needs a guest that reports free pages, which these do not._");
        o.WriteLine($"\n_Load average at the end: {MachineInfo.LoadAverage()}._");
        if (s.Png is not null)
        {
            // The load goes into the picture: a figure from a busy machine must say so where it is seen.
            QemuBenchPlot.Draw(all, s.Png, $"{guest.Short}, cap {Units.Bytes(s.Bandwidth)}/s, {s.Reps} rep(s), medians; load {loadAtStart.Split(' ')[0]} at start");
            Console.Error.WriteLine($"qemu-precopy: wrote {s.Png}");
        }
        return 0;
    }

    private static Settings Parse(string[] args)
    {
        string guest = "bootsector", image = "guests/bootsector/out/bootsector.img", kernelDir = "guests/linux/out";
        long? memory = null;
        long bandwidth = 128L << 20;
        var giveUp = TimeSpan.FromSeconds(30);
        var switchAfter = TimeSpan.FromSeconds(5);
        int reps = 1;
        string? png = null;
        string[]? systems = null;
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            string Next() => i + 1 < args.Length ? args[++i] : throw new ArgumentException($"{a} needs a value");
            switch (a)
            {
                case "--guest": guest = Next() is "bootsector" or "linux" ? args[i] : throw new ArgumentException("--guest: bootsector or linux"); break;
                case "--image": image = Next(); break;
                case "--kernel-dir": kernelDir = Next(); break;
                case "--memory": memory = Units.TryParseBytes(Next(), out long m) && m >= 32L << 20 && m % (1 << 20) == 0 ? m : throw new ArgumentException("--memory: a whole number of MiB, 32MiB or more"); break;
                case "--bandwidth": if (!Units.TryParseRate(Next(), out bandwidth) || bandwidth <= 0) throw new ArgumentException("--bandwidth: a rate, e.g. 128MiB (per second) or 1Gbit"); break;
                case "--give-up": if (!Units.TryParseDuration(Next(), out giveUp) || giveUp <= TimeSpan.Zero) throw new ArgumentException("--give-up: a positive duration, e.g. 30s"); break;
                case "--switch-after": if (!Units.TryParseDuration(Next(), out switchAfter) || switchAfter < TimeSpan.Zero) throw new ArgumentException("--switch-after: a duration, e.g. 5s"); break;
                case "--reps": if (!int.TryParse(Next(), out reps) || reps < 1) throw new ArgumentException("--reps: a positive whole number"); break;
                case "--png": png = Path.GetFullPath(Next()); break;
                case "--systems": systems = Next().Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries); break;
                default: throw new ArgumentException($"unknown option {a}");
            }
        }
        if (guest == "bootsector" && args.Contains("--kernel-dir")) throw new ArgumentException("--kernel-dir is for --guest linux");
        if (guest == "linux" && args.Contains("--image")) throw new ArgumentException("--image is for --guest bootsector (the Linux guest boots --kernel-dir's vmlinuz and initrd.gz)");
        if (switchAfter >= giveUp) throw new ArgumentException("--switch-after must be shorter than --give-up");
        return new Settings(guest, Path.GetFullPath(image), Path.GetFullPath(kernelDir), memory ?? (guest == "linux" ? 256L << 20 : 128L << 20), bandwidth, giveUp, switchAfter, reps, png, systems);
    }

    private static void Emit(TextWriter o, int rep, Row r, bool linux, List<Row> all)
    {
        all.Add(r);
        string head = $"| {rep} | {r.System} | {r.Outcome} | {r.TotalS:0.00} | {(r.Completed ? r.DowntimeMs.ToString("0.0") : "–")} | {Units.Bytes(r.SocketBytes)} | {r.Rounds} |";
        o.WriteLine(head + QemuBench.GuestCells(r.Guest, r.Notes, linux));
    }

    private static List<NativeSettings> NativeConfigurations(Settings s)
    {
        JsonObject Cap(params (string, JsonNode?)[] extra)
        {
            var p = new JsonObject { ["max-bandwidth"] = s.Bandwidth, ["downtime-limit"] = 300 };
            foreach (var (k, v) in extra) p[k] = v;
            return p;
        }
        return
        [
            new("QEMU pre-copy (default)", [], Cap(), s.GiveUp),
            new("QEMU xbzrle (64 MiB cache)", [("xbzrle", true)], Cap(("xbzrle-cache-size", 64L << 20)), s.GiveUp),
            new("QEMU multifd zstd (4 channels)", [("multifd", true)], Cap(("multifd-channels", 4), ("multifd-compression", "zstd")), s.GiveUp),
            new("QEMU auto-converge (20 %, +10 %)", [("auto-converge", true)], Cap(("cpu-throttle-initial", 20), ("cpu-throttle-increment", 10)), s.GiveUp),
            new($"QEMU postcopy-ram (switch after {s.SwitchAfter.TotalSeconds:0.#} s)", [("postcopy-ram", true)], Cap(("max-postcopy-bandwidth", s.Bandwidth)), s.GiveUp, s.SwitchAfter),
        ];
    }

    private static List<(string Name, MigrationOptions Options)> LiveMigConfigurations(Settings s)
    {
        var pre = new PreCopyOptions { TimeBudget = s.GiveUp };
        MigrationOptions With(PipelineOptions? pipeline = null, PreCopyOptions? p = null, int streams = 1) =>
            new() { BandwidthLimit = s.Bandwidth, Pipeline = pipeline ?? new PipelineOptions(), PreCopy = p ?? pre, Streams = streams };
        return
        [
            ("LiveMig best (--optimize all --on-stall postcopy)", With(PipelineOptions.All, pre with { OnStall = StallAction.PostCopy })),
            ("LiveMig no stage", With()),
            ("LiveMig --compress zstd", With(new PipelineOptions { Compression = CompressionKind.Zstd })),
            ("LiveMig --xbzrle-cache 64MiB", With(new PipelineOptions { XbzrleCacheBytes = PipelineOptions.DefaultXbzrleCacheBytes })),
            ("LiveMig --dedup", With(new PipelineOptions { Dedup = true })),
            ("LiveMig --streams 4", With(streams: 4)),
            ("LiveMig --on-stall postcopy", With(p: pre with { OnStall = StallAction.PostCopy })),
            ("LiveMig --on-stall pause --max-downtime 10s", With(p: pre.PauseOnStall(TimeSpan.FromSeconds(10)))),
        ];
    }

    private static Row Native(BenchGuest guest, NativeSettings settings)
    {
        Console.Error.WriteLine($"qemu-precopy: {settings.Name}");
        try
        {
            var r = QemuBench.RunNative(guest, settings);
            string outcome = r.GaveUp ? $"did not converge in {settings.GiveUp.TotalSeconds:0} s" : r.Status;
            string notes = $"ram.transferred {Units.Bytes(r.Transferred)}" + (r.Ram?["postcopy-requests"]?.GetValue<long>() is > 0 and long req ? $"; postcopy-requests {req:N0}" : "")
                + (r.Info["cpu-throttle-percentage"]?.GetValue<long>() is > 0 and long t ? $"; CPU throttle {t} %" : "")
                + (r.Info["xbzrle-cache"]?["cache-miss-rate"]?.GetValue<double>() is double miss ? $"; xbzrle cache miss rate {miss:0.00}" : "");
            return new Row(settings.Name, outcome, r.Status == "completed", r.GaveUp ? r.Elapsed.TotalSeconds : r.TotalS, r.DowntimeMs, r.SocketBytes, r.Iterations, r.Guest, notes);
        }
        catch (Exception e) when (e is Qemu.QmpException or TimeoutException or InvalidOperationException)
        {
            return new Row(settings.Name, "failed: " + e.Message, false, 0, 0, 0, 0, new GuestOutcome(-1), "");
        }
    }

    private static Row LiveMig(BenchGuest guest, string name, MigrationOptions options)
    {
        Console.Error.WriteLine($"qemu-precopy: {name}");
        var r = QemuBench.RunLiveMig(guest, options);
        var report = r.Report;
        string notes = $"stop reason {report.StopReason}" + (report.Strategy != "precopy" || report.Faults > 0 ? $"; switched to post-copy: faults {report.Faults:N0}, pushed {report.PagesPushed:N0}" : "")
            + (report.DowntimeExceededMs is double over ? $"; downtime target exceeded by {over:0} ms" : "")
            + $"; pipeline {report.Pipeline}";
        if (r.Failure is not null)
        {
            // The rounds stalled and the configuration's answer to a stall is to give up (the VM runs on at the source).
            bool stalled = report.StopReason is "max-rounds" or "non-convergence" or "time-budget" or "no-gain";
            string outcome = stalled ? $"did not converge ({report.StopReason}, {report.TotalTimeMs / 1000:0} s)" : "failed: " + r.Failure;
            return new Row(name, outcome, false, report.TotalTimeMs / 1000.0, report.DowntimeMs, r.SocketBytes, report.Rounds.Count, r.Guest, notes);
        }
        string done = report.Verified == true ? "completed, verified" : report.Outcome;
        return new Row(name, done, report.Outcome == "completed", report.TotalTimeMs / 1000.0, report.DowntimeMs, r.SocketBytes, report.Rounds.Count, r.Guest, notes);
    }
}
