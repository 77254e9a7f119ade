using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using LiveMig.Engine;
using LiveMig.Qemu;
using LiveMig.Reporting;

namespace LiveMig.Bench;

/// <summary>What the guest (and its client) said after a migration.</summary>
/// <param name="GuestErrors">The boot-sector guest's own count of stale or lost pages at the destination (-1: no report, or another guest).</param>
internal sealed record GuestOutcome(long GuestErrors, RedisProbeResult? Client = null, RedisKeyCheck? Keys = null, string? Note = null);

/// <summary>
/// A guest the side-by-side QEMU benchmarks migrate: how to start it, when it is ready, and what
/// it says after the move (the boot-sector guest's error count; the Linux guest's redis client).
/// </summary>
internal abstract class BenchGuest
{
    public abstract string Describe { get; }
    /// <summary>A few words for a picture's title.</summary>
    public abstract string Short { get; }
    public abstract QemuVmSpec Spec { get; }
    public abstract QemuHostOptions Host { get; }
    /// <summary>Blocks (bounded) until the source guest is ready for the move.</summary>
    public abstract void WaitReady(QemuVm source);
    /// <summary>Right before the migration starts; <paramref name="destination"/> is the destination QEMU once it exists.</summary>
    public virtual void BeforeMigrate(QemuVm source, Func<QemuProcess?> destination) { }
    /// <summary>The move completed and the destination runs: what the guest (and client) say.</summary>
    public abstract GuestOutcome After(string destinationSerialLog);
    /// <summary>The move did not complete: stop whatever <see cref="BeforeMigrate"/> started.</summary>
    public virtual GuestOutcome Abandoned() => new(-1);
}

/// <summary>The self-checking boot-sector guest (guests/bootsector): ready once it reported; its error counter after two more seconds at the destination.</summary>
internal sealed class BootSectorBenchGuest(string image, long memory) : BenchGuest
{
    public override string Describe => $"the boot-sector guest ({Path.GetFileName(image)}), {Units.Bytes(memory)}, 1 vCPU, TCG";
    public override string Short => $"boot-sector guest, {Units.Bytes(memory)}";
    public override QemuVmSpec Spec { get; } = new() { MemoryBytes = memory, BootImage = image };
    public override QemuHostOptions Host { get; } = new() { AllowedImageDirectories = [Path.GetDirectoryName(image)!] };

    public override void WaitReady(QemuVm source)
    {
        var sw = Stopwatch.StartNew();
        while (BootSectorSerial.Last(BootSectorSerial.Read(source.SerialLog)) is null)
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(60)) throw new InvalidOperationException($"the guest reported nothing on {source.SerialLog} within 60 s");
            Thread.Sleep(50);
        }
    }

    public override GuestOutcome After(string destinationSerialLog)
    {
        Thread.Sleep(2000);
        return new(BootSectorSerial.Last(BootSectorSerial.Read(destinationSerialLog))?.Errors ?? -1);
    }
}

/// <summary>
/// The Linux guest (guests/linux: Debian's cloud kernel, busybox, redis) with guest port 6379
/// forwarded from a port each side picks, and a <see cref="RedisProbe"/> through the move.
/// </summary>
internal sealed class LinuxBenchGuest(string directory, long memory) : BenchGuest
{
    public const int RedisPort = 6379;
    private RedisProbe? _probe;

    public override string Describe => $"the Linux guest (guests/linux, redis), {Units.Bytes(memory)}, 1 vCPU, TCG, a redis client of ours (SET+GET pairs, 500/s)";
    public override string Short => $"Linux guest + redis client, {Units.Bytes(memory)}";
    public override QemuVmSpec Spec { get; } = new()
    {
        MemoryBytes = memory, Kernel = Path.Combine(directory, "vmlinuz"), Initrd = Path.Combine(directory, "initrd.gz"),
        Append = "console=ttyS0 quiet", Network = "user", Forward = [RedisPort],
    };
    public override QemuHostOptions Host { get; } = new() { AllowedImageDirectories = [directory] };

    public override void WaitReady(QemuVm source)
    {
        var sw = Stopwatch.StartNew();
        while (!BootSectorSerial.Read(source.SerialLog).Contains("Ready to accept connections"))
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(120)) throw new InvalidOperationException($"redis did not come up in the Linux guest within 120 s ({source.SerialLog})");
            Thread.Sleep(100);
        }
    }

    public override void BeforeMigrate(QemuVm source, Func<QemuProcess?> destination)
    {
        int sourcePort = source.Process.ForwardedPorts[RedisPort];
        _probe = new RedisProbe(() =>
        {
            var d = destination();
            // The source's port while its QEMU runs; the destination's once it exists (each side chose its own).
            return d is not null && d.ForwardedPorts.TryGetValue(RedisPort, out int p) ? [sourcePort, p] : [sourcePort];
        });
        _probe.Start(TimeSpan.FromSeconds(30));
        Thread.Sleep(1000); // a second of replies before the move: the gap is measured against a running client
    }

    public override GuestOutcome After(string destinationSerialLog)
    {
        var probe = _probe ?? throw new InvalidOperationException("no redis client was started");
        Thread.Sleep(2000); // two seconds of replies at the destination
        var result = probe.Stop();
        var keys = probe.CheckKeys(TimeSpan.FromSeconds(30));
        probe.Dispose();
        _probe = null;
        return new(-1, result, keys, BootSectorSerial.Read(destinationSerialLog).Contains("Kernel panic") ? "kernel panic at the destination" : null);
    }

    public override GuestOutcome Abandoned()
    {
        if (_probe is null) return new(-1);
        var result = _probe.Stop();
        _probe.Dispose();
        _probe = null;
        return new(-1, result);
    }
}

/// <summary>How QEMU's own migration is set up for one row: its capabilities and parameters, and when to give up.</summary>
/// <param name="SwitchToPostCopyAfter">With <c>postcopy-ram</c>: <c>migrate-start-postcopy</c> this long after <c>migrate</c>.</param>
internal sealed record NativeSettings(string Name, IReadOnlyList<(string Capability, bool On)> Capabilities, JsonObject Parameters, TimeSpan GiveUp, TimeSpan? SwitchToPostCopyAfter = null);

/// <summary>What one QEMU-to-QEMU migration did: QEMU's final <c>query-migrate</c>, the bytes at the socket, and the guest after.</summary>
internal sealed record NativeResult(string Status, bool GaveUp, TimeSpan Elapsed, JsonObject Info, long SocketBytes, GuestOutcome Guest)
{
    public JsonObject? Ram => Info["ram"] as JsonObject;
    public double TotalS => (Info["total-time"]?.GetValue<long>() ?? (long)Elapsed.TotalMilliseconds) / 1000.0;
    public double DowntimeMs => Info["downtime"]?.GetValue<long>() ?? 0;
    public long Iterations => Ram?["dirty-sync-count"]?.GetValue<long>() ?? 0;
    public long Transferred => Ram?["transferred"]?.GetValue<long>() ?? 0;
}

/// <summary>What one LiveMig migration of a QEMU guest did: its report (or why it failed), the bytes at the socket, and the guest after.</summary>
internal sealed record LiveMigResult(MigrationReport Report, string? Failure, long SocketBytes, GuestOutcome Guest);

/// <summary>
/// The parts the side-by-side QEMU benchmarks (<c>qemu-precopy</c>, <c>qemu-postcopy</c>) share:
/// QEMU's own migration driven over QMP and LiveMig's, each through a <see cref="CountingRelay"/>
/// so that the bytes are the ones at the socket (QEMU's <c>ram.transferred</c> counts before
/// compression), both directions, every connection.
/// </summary>
internal static class QemuBench
{
    /// <summary>
    /// A table row's cells after the system's own (both scenarios): the guest's error count, or for
    /// the Linux guest the redis client's longest gap, replies, errors and keys read back; then the notes.
    /// </summary>
    public static string GuestCells(GuestOutcome guest, string rowNotes, bool linux)
    {
        if (!linux) return $" {(guest.GuestErrors < 0 ? "–" : guest.GuestErrors.ToString())} | {rowNotes} |";
        var c = guest.Client;
        string client = c is null ? " – | – | – |" : $" {c.LongestGapMs:0} | {c.Requests:N0} | {c.Errors} |";
        string keys = guest.Keys is { } k ? (k.AllThere ? $"all {k.Checked:N0}" : k.ToString()) : "–";
        string notes = string.Join("; ", new[] { rowNotes, c is null ? null : $"client reconnects {c.Reconnects}, keys in doubt {c.KeysInDoubt}, wrong answers {c.WrongAnswers}", guest.Note }.Where(n => !string.IsNullOrEmpty(n)));
        return $"{client} {keys} | {notes} |";
    }

    /// <summary>
    /// QEMU to QEMU on this host: the source from the guest's description, a destination with
    /// <c>-incoming defer -S</c>, <c>x-ignore-shared</c> off (QEMU moves the RAM itself here) and
    /// <paramref name="s"/>'s capabilities on both, its parameters on the source, <c>migrate</c>
    /// through the relay; polled until it ends, or cancelled (<c>migrate_cancel</c>) once it ran
    /// <see cref="NativeSettings.GiveUp"/>. The destination is <c>cont</c>ed as soon as it is
    /// paused (it was started with <c>-S</c>, as LiveMig's is) and the source QEMU killed once
    /// it completed, as a management layer would.
    /// </summary>
    public static NativeResult RunNative(BenchGuest guest, NativeSettings s)
    {
        using var source = QemuVm.Start("bench-native-src", guest.Spec, guest.Host);
        guest.WaitReady(source);
        using var dest = QemuProcess.Start(guest.Spec, guest.Host, "bench-native-dst", incoming: true);
        // QEMU's own migration as it comes: not LiveMig's pause before the switch-over.
        var caps = new JsonArray(new JsonObject { ["capability"] = "x-ignore-shared", ["state"] = false }, new JsonObject { ["capability"] = "pause-before-switchover", ["state"] = false });
        foreach (var (name, on) in s.Capabilities) caps.Add(new JsonObject { ["capability"] = name, ["state"] = on });
        foreach (var q in new[] { source.Process, dest }) q.Qmp.Execute("migrate-set-capabilities", new JsonObject { ["capabilities"] = caps.DeepClone() });
        // multifd-channels and multifd-compression must match on both sides; the others are the source's.
        var incomingParameters = new JsonObject();
        foreach (var (k, v) in s.Parameters) if (k.StartsWith("multifd", StringComparison.Ordinal)) incomingParameters[k] = v?.DeepClone();
        if (incomingParameters.Count > 0) dest.Qmp.Execute("migrate-set-parameters", incomingParameters);
        int port = FreePort();
        dest.Qmp.Execute("migrate-incoming", new JsonObject { ["uri"] = $"tcp:127.0.0.1:{port}" });
        using var relay = new CountingRelay(port);
        source.Process.Qmp.Execute("migrate-set-parameters", (JsonObject)s.Parameters.DeepClone());
        guest.BeforeMigrate(source, () => dest);
        source.Process.Qmp.Execute("migrate", new JsonObject { ["uri"] = $"tcp:127.0.0.1:{relay.Port}" });
        var sw = Stopwatch.StartNew();
        bool switched = false, resumed = false;
        JsonObject info;
        string status;
        while (true)
        {
            info = source.Process.Qmp.Execute("query-migrate") as JsonObject ?? [];
            status = info["status"]?.GetValue<string>() ?? "none";
            if (!resumed && dest.Qmp.Execute("query-status")?["status"]?.GetValue<string>() == "paused") { dest.Qmp.Execute("cont"); resumed = true; }
            if (status is "completed" or "failed" or "cancelled") break;
            if (s.SwitchToPostCopyAfter is { } after && !switched && sw.Elapsed >= after) { source.Process.Qmp.Execute("migrate-start-postcopy"); switched = true; }
            if (sw.Elapsed > s.GiveUp && !switched) return GiveUp(source, info, sw.Elapsed, relay, guest);
            if (sw.Elapsed > s.GiveUp + TimeSpan.FromMinutes(2)) throw new TimeoutException($"{s.Name}: QEMU's post-copy did not finish within 2 minutes after the give-up time");
            Thread.Sleep(1);
        }
        if (!resumed && status == "completed" && dest.Qmp.Execute("query-status")?["status"]?.GetValue<string>() == "paused") dest.Qmp.Execute("cont");
        if (status != "completed") return new NativeResult(status, false, sw.Elapsed, info, relay.Bytes, guest.Abandoned());
        source.Process.Kill(); // it runs elsewhere now: its forwarded ports close, as LiveMig's source's do
        return new NativeResult(status, false, sw.Elapsed, info, relay.Bytes, guest.After(dest.SerialLog));
    }

    /// <summary>Cancels QEMU's migration that did not converge in time; the source keeps running.</summary>
    private static NativeResult GiveUp(QemuVm source, JsonObject info, TimeSpan elapsed, CountingRelay relay, BenchGuest guest)
    {
        source.Process.Qmp.Execute("migrate_cancel");
        var sw = Stopwatch.StartNew();
        while (source.Process.Qmp.Execute("query-migrate")?["status"]?.GetValue<string>() is not ("cancelled" or "failed" or "completed") && sw.Elapsed < TimeSpan.FromSeconds(10)) Thread.Sleep(10);
        return new NativeResult("did not converge", true, elapsed, info, relay.Bytes, guest.Abandoned());
    }

    /// <summary>LiveMig's migration of the guest to an agent in this process, every connection through the relay (the engine its options call for).</summary>
    public static LiveMigResult RunLiveMig(BenchGuest guest, MigrationOptions options)
    {
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        var factory = new QemuVmFactory(guest.Host);
        using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions { VmFactories = [factory] });
        listener.Arrived += a => arrived.TrySetResult(a);
        listener.Start();
        using var relay = new CountingRelay(listener.Port);
        using var source = QemuVm.Start("bench-livemig-src", guest.Spec, guest.Host);
        guest.WaitReady(source);
        guest.BeforeMigrate(source, () => factory.WaitingProcesses.FirstOrDefault() ?? listener.Vms.OfType<QemuVm>().FirstOrDefault()?.Process);
        MigrationReport report;
        try { report = Migrations.MigrateTo(source, options, null, "127.0.0.1", relay.Port); }
        catch (MigrationFailedException e) { return new LiveMigResult(e.Report, e.Message, relay.Bytes, guest.Abandoned()); }
        if (!arrived.Task.Wait(TimeSpan.FromSeconds(30))) return new LiveMigResult(report, "the destination did not report the arrival within 30 s", relay.Bytes, guest.Abandoned());
        using var vm = arrived.Task.Result.Vm;
        return new LiveMigResult(report, null, relay.Bytes, guest.After(((QemuVm)vm).SerialLog));
    }

    public static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }
}

/// <summary>A TCP relay on 127.0.0.1 to <c>target</c> that counts every byte it forwards, both ways, for any number of connections.</summary>
internal sealed class CountingRelay : IDisposable
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
