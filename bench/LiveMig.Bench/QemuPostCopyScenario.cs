using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
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
/// page arrived. One Markdown table on stdout.
/// <code>LiveMig.Bench qemu-postcopy [--image guests/bootsector/out/bootsector.img] [--memory 128MiB] [--bandwidth 128MiB] [--switch-after 5s] [--reps 1]</code>
/// </summary>
internal static class QemuPostCopyScenario
{
    private sealed record Row(string System, string Outcome, double TotalS, double DowntimeMs, long SocketBytes, long Faults, long GuestErrors, string Notes);

    public static int Run(string[] args)
    {
        string image = "guests/bootsector/out/bootsector.img";
        long memory = 128L << 20, bandwidth = 128L << 20;
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
                    case "--image": image = Next(); break;
                    case "--memory": if (!Units.TryParseBytes(Next(), out memory) || memory < 32L << 20) throw new ArgumentException("--memory: a size of 32MiB or more"); break;
                    case "--bandwidth": if (!Units.TryParseRate(Next(), out bandwidth) || bandwidth <= 0) throw new ArgumentException("--bandwidth: a rate, e.g. 128MiB (per second) or 1Gbit"); break;
                    case "--switch-after": if (!Units.TryParseDuration(Next(), out switchAfter)) throw new ArgumentException("--switch-after: a duration, e.g. 5s"); break;
                    case "--reps": if (!int.TryParse(Next(), out reps) || reps < 1) throw new ArgumentException("--reps: a positive whole number"); break;
                    default: throw new ArgumentException($"unknown option {a}");
                }
            }
        }
        catch (ArgumentException e) { Console.Error.WriteLine($"qemu-postcopy: {e.Message}"); return 2; }
        image = Path.GetFullPath(image);
        if (!File.Exists(image)) { Console.Error.WriteLine($"qemu-postcopy: no boot image {image} (guests/bootsector/build.sh builds it; scripts/install-qemu.sh installs QEMU and nasm)"); return 2; }

        var o = Console.Out;
        o.WriteLine("## QEMU post-copy side by side: QEMU's postcopy-ram and LiveMig's post-copy and hybrid");
        o.WriteLine();
        o.WriteLine($"Command: `LiveMig.Bench qemu-postcopy {string.Join(' ', args)}`");
        o.WriteLine();
        o.WriteLine(MachineInfo.Markdown());
        o.WriteLine($"Guest: the boot-sector guest ({Path.GetFileName(image)}), {Units.Bytes(memory)}, 1 vCPU, TCG; cap {Units.Bytes(bandwidth)}/s; QEMU switches to post-copy after {switchAfter.TotalSeconds:0.#} s. Load average at start: {MachineInfo.LoadAverage()}.");
        o.WriteLine();
        o.WriteLine("| system | outcome | total s | downtime ms | bytes at the socket | faults / page requests | guest errors after | notes |");
        o.WriteLine("|---|---|---:|---:|---:|---:|---:|---|");
        var spec = new QemuVmSpec { MemoryBytes = memory, BootImage = image };
        var host = new QemuHostOptions { AllowedImageDirectories = [Path.GetDirectoryName(image)!] };
        string? preempt = PreemptCapability(spec, host);
        for (int rep = 0; rep < reps; rep++)
        {
            var rows = new List<Row> { Native(spec, host, bandwidth, switchAfter, null) };
            if (preempt is not null) rows.Add(Native(spec, host, bandwidth, switchAfter, preempt));
            rows.Add(LiveMig(spec, host, bandwidth, MigrationStrategy.PostCopy));
            rows.Add(LiveMig(spec, host, bandwidth, MigrationStrategy.Hybrid));
            foreach (var r in rows)
                o.WriteLine($"| {r.System} | {r.Outcome} | {r.TotalS:0.00} | {r.DowntimeMs:0.0} | {Units.Bytes(r.SocketBytes)} | {r.Faults:N0} | {r.GuestErrors} | {r.Notes} |");
        }
        if (preempt is null) o.WriteLine("\n_This QEMU has no postcopy-preempt capability: that row is left out._");
        o.WriteLine($"\n_Load average at the end: {MachineInfo.LoadAverage()}._");
        return 0;
    }

    /// <summary>The name of QEMU's post-copy preemption capability, if this QEMU has one.</summary>
    private static string? PreemptCapability(QemuVmSpec spec, QemuHostOptions host)
    {
        using var probe = QemuProcess.Start(spec, host, "probe", incoming: true);
        var caps = probe.Qmp.Execute("query-migrate-capabilities") as JsonArray ?? [];
        return caps.Select(c => c?["capability"]?.GetValue<string>()).FirstOrDefault(n => n is "postcopy-preempt" or "x-postcopy-preempt");
    }

    private static void SetCapabilities(QemuProcess q, string? preempt)
    {
        var caps = new JsonArray(
            new JsonObject { ["capability"] = "x-ignore-shared", ["state"] = false }, // QEMU moves the RAM itself here
            new JsonObject { ["capability"] = "postcopy-ram", ["state"] = true });
        if (preempt is not null) caps.Add(new JsonObject { ["capability"] = preempt, ["state"] = true });
        q.Qmp.Execute("migrate-set-capabilities", new JsonObject { ["capabilities"] = caps });
    }

    /// <summary>QEMU's own migration: pre-copy at the cap, <c>migrate-start-postcopy</c> after <paramref name="switchAfter"/>, through the relay.</summary>
    private static Row Native(QemuVmSpec spec, QemuHostOptions host, long bandwidth, TimeSpan switchAfter, string? preempt)
    {
        string name = preempt is null ? "QEMU postcopy-ram" : $"QEMU postcopy-ram + {preempt}";
        Console.Error.WriteLine($"qemu-postcopy: {name}");
        using var source = QemuVm.Start("bench-native-src", spec, host);
        WaitForGuest(source.SerialLog);
        using var dest = QemuProcess.Start(spec, host, "bench-native-dst", incoming: true);
        SetCapabilities(source.Process, preempt);
        SetCapabilities(dest, preempt);
        int port = FreePort();
        dest.Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = $"tcp:127.0.0.1:{port}" });
        using var relay = new CountingRelay(port);
        source.Process.Qmp.Execute("migrate-set-parameters", new JsonObject { ["max-bandwidth"] = bandwidth, ["max-postcopy-bandwidth"] = bandwidth });
        source.Process.Qmp.Execute("migrate", new JsonObject { ["uri"] = $"tcp:127.0.0.1:{relay.Port}" });
        var sw = Stopwatch.StartNew();
        bool switched = false, resumed = false;
        JsonObject info;
        while (true)
        {
            info = source.Process.Qmp.Execute("query-migrate") as JsonObject ?? [];
            string status = info["status"]?.GetValue<string>() ?? "none";
            if (status is "completed" or "failed" or "cancelled") break;
            if (!switched && sw.Elapsed >= switchAfter) { source.Process.Qmp.Execute("migrate-start-postcopy"); switched = true; }
            // Started with -S, the destination comes up paused after the switch: cont it at once (as LiveMig's Commit does).
            if (switched && !resumed && dest.Qmp.Execute("query-status")?["status"]?.GetValue<string>() == "paused") { dest.Qmp.Execute("cont"); resumed = true; }
            if (sw.Elapsed > TimeSpan.FromMinutes(3)) { source.Process.Qmp.Execute("migrate_cancel"); return new Row(name, "timed out (3 min)", sw.Elapsed.TotalSeconds, 0, relay.Bytes, 0, -1, ""); }
            Thread.Sleep(1);
        }
        if (!resumed && dest.Qmp.Execute("query-status")?["status"]?.GetValue<string>() == "paused") dest.Qmp.Execute("cont");
        string outcome = info["status"]!.GetValue<string>();
        var ram = info["ram"] as JsonObject;
        long errors = GuestErrorsAfter(dest.SerialLog);
        return new Row(name, outcome, (info["total-time"]?.GetValue<long>() ?? 0) / 1000.0, info["downtime"]?.GetValue<long>() ?? 0, relay.Bytes,
            ram?["postcopy-requests"]?.GetValue<long>() ?? 0, errors, $"ram.transferred {Units.Bytes(ram?["transferred"]?.GetValue<long>() ?? 0)}; faults column: QEMU's postcopy-requests");
    }

    /// <summary>LiveMig's post-copy or hybrid (two rounds) of the same guest to an agent in this process, both connections through the relay.</summary>
    private static Row LiveMig(QemuVmSpec spec, QemuHostOptions host, long bandwidth, MigrationStrategy strategy)
    {
        string name = $"LiveMig {Migrations.Name(strategy)}";
        Console.Error.WriteLine($"qemu-postcopy: {name}");
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions { VmFactories = [new QemuVmFactory(host)] });
        listener.Arrived += a => arrived.TrySetResult(a);
        listener.Start();
        using var relay = new CountingRelay(listener.Port);
        using var source = QemuVm.Start($"bench-{Migrations.Name(strategy)}", spec, host);
        WaitForGuest(source.SerialLog);
        var options = new MigrationOptions { Strategy = strategy, BandwidthLimit = bandwidth, PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = 2 } } };
        var engine = new PostCopyMigration(source, options)
        {
            Connector = (_, _) =>
            {
                var s = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
                s.Connect(IPAddress.Loopback, relay.Port);
                return new NetworkStream(s, ownsSocket: true);
            },
        };
        Reporting.MigrationReport report;
        try { report = engine.MigrateTo("127.0.0.1", relay.Port); }
        catch (MigrationFailedException e) { return new Row(name, "failed: " + e.Message, 0, 0, relay.Bytes, 0, -1, ""); }
        long errors = -1;
        if (arrived.Task.Wait(TimeSpan.FromSeconds(30)))
        {
            using var vm = arrived.Task.Result.Vm;
            errors = GuestErrorsAfter(((QemuVm)vm).SerialLog);
        }
        return new Row(name, report.Verified == true ? "completed, verified" : report.Outcome, report.TotalTimeMs / 1000.0, report.DowntimeMs, relay.Bytes, report.Faults, errors,
            $"pushed {report.PagesPushed:N0}, requested {report.PagesRequested:N0}; fault p50/p99 {report.FaultLatencyUs?.P50:0} / {report.FaultLatencyUs?.P99:0} µs; time to resume {report.TimeToResumeMs / 1000:0.00} s");
    }

    private static void WaitForGuest(string serialLog)
    {
        var sw = Stopwatch.StartNew();
        while (BootSectorSerial.Last(BootSectorSerial.Read(serialLog)) is null)
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(60)) throw new InvalidOperationException($"the guest reported nothing on {serialLog} within 60 s");
            Thread.Sleep(50);
        }
    }

    /// <summary>The guest's own count of stale or lost pages, after it ran two more seconds at the destination (-1: no report).</summary>
    private static long GuestErrorsAfter(string serialLog)
    {
        Thread.Sleep(2000);
        return BootSectorSerial.Last(BootSectorSerial.Read(serialLog))?.Errors ?? -1;
    }

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    /// <summary>A TCP relay on 127.0.0.1 to <c>target</c> that counts every byte it forwards, both ways, for any number of connections.</summary>
    private sealed class CountingRelay : IDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly int _target;
        private readonly CancellationTokenSource _stop = new();
        private long _bytes;

        public CountingRelay(int target)
        {
            _target = target;
            _listener.Start();
            _ = AcceptLoop();
        }

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;
        public long Bytes => Interlocked.Read(ref _bytes);

        private async Task AcceptLoop()
        {
            while (!_stop.IsCancellationRequested)
            {
                Socket a;
                try { a = await _listener.AcceptSocketAsync(_stop.Token); }
                catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException) { return; }
                var b = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
                a.NoDelay = true;
                try { await b.ConnectAsync(IPAddress.Loopback, _target); }
                catch (SocketException) { a.Dispose(); b.Dispose(); continue; }
                _ = Pump(a, b);
                _ = Pump(b, a);
            }
        }

        private async Task Pump(Socket from, Socket to)
        {
            var buffer = new byte[256 << 10];
            try
            {
                while (true)
                {
                    int n = await from.ReceiveAsync(buffer, SocketFlags.None, _stop.Token);
                    if (n == 0) break;
                    Interlocked.Add(ref _bytes, n);
                    await to.SendAsync(buffer.AsMemory(0, n), SocketFlags.None, _stop.Token);
                }
                to.Shutdown(SocketShutdown.Send);
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
                try { to.Shutdown(SocketShutdown.Both); } catch (Exception x) when (x is SocketException or ObjectDisposedException) { }
            }
        }

        public void Dispose()
        {
            _stop.Cancel();
            _listener.Stop();
        }
    }
}
