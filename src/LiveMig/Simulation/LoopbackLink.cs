using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace LiveMig.Simulation;

/// <summary>What this machine's loopback TCP carries, measured: the rate of one stream and a small message's round trip.</summary>
/// <param name="BytesPerSecond">Payload bytes per second of one TCP stream over 127.0.0.1, uncapped.</param>
/// <param name="RoundTrip">Median round trip of a one-byte ping-pong over a connected socket.</param>
public sealed record LoopbackLink(double BytesPerSecond, [property: System.Text.Json.Serialization.JsonIgnore] TimeSpan RoundTrip)
{
    public double RoundTripUs => RoundTrip.TotalMicroseconds;

    /// <summary>
    /// Measures the loopback link: sends <paramref name="bytes"/> over one TCP connection (1 MiB
    /// writes, the reader discards) and times it to the last byte read, then <paramref name="pings"/>
    /// one-byte round trips (the median: a loaded machine's preemptions only ever add). Real sockets,
    /// bounded: every call has a timeout.
    /// </summary>
    public static LoopbackLink Measure(long bytes = 256L << 20, int pings = 200)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(bytes, 1L << 20);
        ArgumentOutOfRangeException.ThrowIfLessThan(pings, 1);
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start(1);
        using var client = new TcpClient { NoDelay = true, ReceiveTimeout = 30_000, SendTimeout = 30_000 };
        client.Connect(IPAddress.Loopback, ((IPEndPoint)listener.LocalEndpoint).Port);
        using var server = listener.AcceptTcpClient();
        server.NoDelay = true;
        server.ReceiveTimeout = server.SendTimeout = 30_000;
        var send = client.GetStream();
        var receive = server.GetStream();
        double rate = Stream(send, receive, bytes);
        var rtt = PingPong(send, receive, pings);
        return new LoopbackLink(rate, rtt);
    }

    private static double Stream(NetworkStream send, NetworkStream receive, long bytes)
    {
        var reader = Task.Run(() =>
        {
            var buffer = new byte[1 << 20];
            long got = 0;
            while (got < bytes)
            {
                int n = receive.Read(buffer);
                if (n == 0) throw new IOException("loopback connection closed early");
                got += n;
            }
            return Stopwatch.GetTimestamp();
        });
        var chunk = new byte[1 << 20];
        new Random(1).NextBytes(chunk);
        long start = Stopwatch.GetTimestamp();
        for (long sent = 0; sent < bytes; sent += chunk.Length) send.Write(chunk, 0, (int)Math.Min(chunk.Length, bytes - sent));
        if (!reader.Wait(TimeSpan.FromSeconds(60))) throw new TimeoutException("loopback transfer did not finish in 60 s");
        return bytes / Stopwatch.GetElapsedTime(start, reader.Result).TotalSeconds;
    }

    private static TimeSpan PingPong(NetworkStream send, NetworkStream receive, int pings)
    {
        var echo = Task.Run(() =>
        {
            var b = new byte[1];
            for (int i = 0; i < pings; i++)
            {
                receive.ReadExactly(b);
                receive.Write(b);
            }
        });
        var one = new byte[1];
        var times = new double[pings];
        for (int i = 0; i < pings; i++)
        {
            long t = Stopwatch.GetTimestamp();
            send.Write(one);
            send.ReadExactly(one);
            times[i] = Stopwatch.GetElapsedTime(t).TotalSeconds;
        }
        if (!echo.Wait(TimeSpan.FromSeconds(30))) throw new TimeoutException("loopback echo did not finish in 30 s");
        Array.Sort(times);
        return TimeSpan.FromSeconds(times[pings / 2]);
    }
}
