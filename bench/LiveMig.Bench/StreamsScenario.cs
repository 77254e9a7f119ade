using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using LiveMig.Engine;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Bench;

/// <summary>
/// Several data streams (issue 5): a guest of incompressible memory (every page random, idle
/// workload) migrated over loopback with no bandwidth limit at 1, 2 and 4 streams, with and
/// without TLS (pre-shared-key mode: TLS 1.3, AES-GCM), against plain TCP copies of the same
/// bytes in the same repetition over 1, 2 and 4 sockets (each socket a sender and a receiver
/// thread, receivers reading into a reused array). "1 stream" is the classic single connection
/// (pages on the control connection); N ≥ 2 is N data connections beside the control connection.
/// </summary>
internal static class StreamsScenario
{
    private sealed record Transfer(double Seconds, long Bytes)
    {
        public double BytesPerSecond => Bytes / Seconds;
    }

    private static readonly int[] Counts = [1, 2, 4];

    private static string PlainName(int n) => $"Plain TCP copy, {n} socket{(n > 1 ? "s" : "")}";
    private static string MigName(int n, bool tls) => $"LiveMig, {n} stream{(n > 1 ? "s" : "")}{(tls ? ", TLS" : "")}";

    /// <param name="bandwidth">A cap on the migrations (0: none), to show what TLS costs when the link, not the CPU, sets the pace; the plain copies stay uncapped.</param>
    public static void Run(long memoryBytes, int reps, TextWriter output, long bandwidth = 0)
    {
        byte[] key = new byte[32];
        Random.Shared.NextBytes(key);
        var psk = ChannelSecurity.FromPreSharedKey(key);
        var results = new List<Dictionary<string, (Transfer Round0, Transfer Total)>>();
        for (int r = 0; r < reps; r++)
        {
            var rep = new Dictionary<string, (Transfer, Transfer)>();
            var config = new VmConfig { Name = $"streams{r}", MemoryBytes = memoryBytes, Vcpus = 2, Workload = "idle", Fill = MemoryFill.Random, Seed = (ulong)(r + 1) };
            long bytes = 0;
            foreach (bool tls in new[] { false, true })
            {
                foreach (int n in Counts)
                {
                    var options = new MigrationOptions { Verify = true, Streams = n, BandwidthLimit = bandwidth, Security = tls ? psk : ChannelSecurity.None };
                    var m = LoopbackMigration.Run(config with { Name = $"streams{r}-{n}{(tls ? "t" : "")}" }, options, destination: new DestinationOptions { Security = tls ? psk : ChannelSecurity.None });
                    var r0 = m.Source.Rounds[0];
                    bytes = r0.BytesSent;
                    rep[MigName(n, tls)] = (new Transfer(r0.DurationMs / 1000, r0.BytesSent), new Transfer(m.Source.TotalTimeMs / 1000, r0.BytesSent));
                    ThroughputScenario.Progress($"rep {r + 1}/{reps}: {MigName(n, tls)}: round 0 {r0.DurationMs / 1000:0.000} s ({Stats.GB(r0.BytesSent) / (r0.DurationMs / 1000):0.00} GB/s), total {m.Source.TotalTimeMs / 1000:0.000} s, " +
                                                $"downtime {m.Source.DowntimeMs:0} ms, CPU of the source migration thread {m.SourceCpu.TotalSeconds:0.00} s and destination connection thread {m.DestinationCpu.TotalSeconds:0.00} s (with N ≥ 2 streams: the control threads only)");
                }
                if (!tls)
                {
                    // The plain copies in the middle of the repetition, between the two LiveMig halves.
                    foreach (int n in Counts)
                    {
                        double s = ParallelCopy(bytes, n);
                        rep[PlainName(n)] = (new Transfer(s, bytes), new Transfer(s, bytes));
                        ThroughputScenario.Progress($"rep {r + 1}/{reps}: {PlainName(n)}: {s:0.000} s, {Stats.GB(bytes) / s:0.00} GB/s");
                    }
                }
            }
            results.Add(rep);
        }

        long wire = (long)Stats.Median(results.Select(x => (double)x[PlainName(1)].Total.Bytes));
        output.WriteLine($"### Several data streams: {Units.Bytes(memoryBytes)} guest, every page random (incompressible), workload `idle`, loopback TCP, {(bandwidth > 0 ? $"migrations capped at {Units.Bytes(bandwidth)}/s (the plain copies are not)" : "no bandwidth limit")}, verify on");
        output.WriteLine();
        output.WriteLine($"Bytes per transfer: {wire:N0} ({Stats.GB(wire):0.000} GB; LiveMig's round-0 bytes on the wire, the plain copies push the same count). " +
                         $"TLS = TLS 1.3 in pre-shared-key mode (`--tls --psk-file`) on every connection. GB = 10^9 bytes. Median of {reps}; ratios are taken per repetition (same run), then the median.");
        output.WriteLine();
        output.WriteLine("| Transfer | Round 0 s | Round 0 GB/s | Ratio to plain copy, 1 socket | Ratio to plain copy, same socket count | Ratio to LiveMig 1 stream (same TLS) | Whole migration s |");
        output.WriteLine("|---|---:|---:|---:|---:|---:|---:|");
        foreach (int n in Counts)
        {
            string name = PlainName(n);
            output.WriteLine($"| {name} | {Stats.Median(results.Select(r => r[name].Round0.Seconds)):0.000} | {Stats.Median(results.Select(r => Stats.GB(r[name].Round0.BytesPerSecond))):0.00} | " +
                             $"{Stats.Median(results.Select(r => r[name].Round0.BytesPerSecond / r[PlainName(1)].Round0.BytesPerSecond)):0.00} | 1.00 | - | - |");
        }
        foreach (bool tls in new[] { false, true })
        {
            foreach (int n in Counts)
            {
                string name = MigName(n, tls);
                double s = Stats.Median(results.Select(r => r[name].Round0.Seconds));
                double gbps = Stats.Median(results.Select(r => Stats.GB(r[name].Round0.BytesPerSecond)));
                double toPlain = Stats.Median(results.Select(r => r[name].Round0.BytesPerSecond / r[PlainName(1)].Round0.BytesPerSecond));
                double toPlainN = Stats.Median(results.Select(r => r[name].Round0.BytesPerSecond / r[PlainName(n)].Round0.BytesPerSecond));
                double toOne = Stats.Median(results.Select(r => r[name].Round0.BytesPerSecond / r[MigName(1, tls)].Round0.BytesPerSecond));
                double total = Stats.Median(results.Select(r => r[name].Total.Seconds));
                output.WriteLine($"| {name} | {s:0.000} | {gbps:0.00} | {toPlain:0.00} | {toPlainN:0.00} | {toOne:0.00} | {total:0.000} |");
            }
        }
        output.WriteLine();
        output.WriteLine("TLS ÷ clear, whole-migration time, per repetition then the median: " +
                         string.Join("; ", Counts.Select(n => $"{n} stream{(n > 1 ? "s" : "")} {Stats.Median(results.Select(r => r[MigName(n, true)].Total.Seconds / r[MigName(n, false)].Total.Seconds)):0.00}")) + ".");
        output.WriteLine();
        output.WriteLine("<details><summary>Per repetition (round-0 seconds)</summary>");
        output.WriteLine();
        var names = Counts.Select(PlainName).Concat(new[] { false, true }.SelectMany(t => Counts.Select(n => MigName(n, t)))).ToList();
        output.WriteLine("| Rep | " + string.Join(" | ", names) + " |");
        output.WriteLine("|---:|" + string.Concat(names.Select(_ => "---:|")));
        for (int i = 0; i < results.Count; i++)
            output.WriteLine($"| {i + 1} | " + string.Join(" | ", names.Select(n => $"{results[i][n].Round0.Seconds:0.000}")) + " |");
        output.WriteLine();
        output.WriteLine("</details>");
        output.WriteLine();
    }

    /// <summary>
    /// <paramref name="bytes"/> through <paramref name="sockets"/> plain TCP connections over
    /// 127.0.0.1 at once (an equal share each; a sender and a receiver thread per socket, 1 MiB
    /// writes from one reused array, reads into one reused array): seconds from the first byte
    /// sent to the last byte received.
    /// </summary>
    public static double ParallelCopy(long bytes, int sockets)
    {
        using var listen = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listen.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listen.Listen(sockets);
        var pairs = new List<(Socket Client, Socket Server)>();
        for (int i = 0; i < sockets; i++)
        {
            var c = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            c.Connect(listen.LocalEndPoint!);
            var s = listen.Accept();
            s.NoDelay = true;
            pairs.Add((c, s));
        }
        byte[] send = new byte[PlainCopy.BufferSize];
        Random.Shared.NextBytes(send);
        using var start = new Barrier(2 * sockets + 1);
        var errors = new List<Exception>();
        var threads = new List<Thread>();
        for (int i = 0; i < sockets; i++)
        {
            var (client, server) = pairs[i];
            long share = bytes / sockets + (i == 0 ? bytes % sockets : 0);
            threads.Add(new Thread(() =>
            {
                start.SignalAndWait();
                try
                {
                    for (long left = share; left > 0;)
                    {
                        int n = (int)Math.Min(left, send.Length), off = 0;
                        while (off < n) off += client.Send(send, off, n - off, SocketFlags.None);
                        left -= n;
                    }
                    client.Shutdown(SocketShutdown.Send);
                }
                catch (Exception e) { lock (errors) errors.Add(e); }
            }) { IsBackground = true, Name = $"plain-sender-{i}" });
            threads.Add(new Thread(() =>
            {
                byte[] receive = new byte[PlainCopy.BufferSize];
                start.SignalAndWait();
                try
                {
                    for (long got = 0; got < share;)
                    {
                        int n = server.Receive(receive, 0, (int)Math.Min(receive.Length, share - got), SocketFlags.None);
                        if (n == 0) throw new IOException($"sender closed after {got} of {share} bytes");
                        got += n;
                    }
                }
                catch (Exception e) { lock (errors) errors.Add(e); }
            }) { IsBackground = true, Name = $"plain-receiver-{i}" });
        }
        foreach (var t in threads) t.Start();
        start.SignalAndWait();
        long t0 = Stopwatch.GetTimestamp();
        foreach (var t in threads) t.Join();
        double seconds = Stopwatch.GetElapsedTime(t0).TotalSeconds;
        foreach (var (c, s) in pairs) { c.Dispose(); s.Dispose(); }
        if (errors.Count > 0) throw new IOException("plain copy failed", errors[0]);
        return seconds;
    }
}
