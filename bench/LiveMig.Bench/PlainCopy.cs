using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using LiveMig.Memory;

namespace LiveMig.Bench;

/// <summary>
/// The baselines: the same bytes through one plain TCP connection over 127.0.0.1, a sender
/// writing 1 MiB buffers from one reused array, a receiver reading into one reused 1 MiB array
/// and, in the second variant, copying each 1 MiB page by page into fresh memfd-backed guest
/// memory (what the destination must do, first touch included); the third copies into memfd
/// memory populated (<c>MADV_POPULATE_WRITE</c>) before the clock starts: the ceiling for a
/// destination that prepares its memory ahead of the data.
/// </summary>
internal static class PlainCopy
{
    public const int BufferSize = 1 << 20;

    /// <summary>Seconds from the first byte sent to the last byte received (and placed).</summary>
    public static double Run(long bytes, bool intoFreshGuestMemory, bool populateFirst = false) => Measure(bytes, intoFreshGuestMemory, populateFirst, 0).Seconds;

    /// <summary>
    /// Seconds, and the CPU time of the sending and the receiving thread. <paramref name="ballastBytes"/>
    /// of other memfd memory, populated before the clock starts, are held during the copy, as a
    /// migration's source VM holds its memory while the destination fills fresh memory: on this
    /// machine fresh memory costs more per first touch the more memory is already in use.
    /// </summary>
    public static (double Seconds, ThreadCpu Sender, ThreadCpu Receiver, double ProcessCpuSeconds) Measure(long bytes, bool intoFreshGuestMemory, bool populateFirst, long ballastBytes)
    {
        using var ballast = ballastBytes > 0 ? GuestMemory.Create(RoundUpToPage(ballastBytes), "livemig-bench-ballast") : null;
        ballast?.Populate(0, ballast.PageCount);
        using var memory = intoFreshGuestMemory || populateFirst ? GuestMemory.Create(RoundUpToPage(bytes), "livemig-bench-plain") : null;
        if (populateFirst) memory!.Populate(0, memory.PageCount);
        using var listen = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listen.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listen.Listen(1);
        using var client = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        client.Connect(listen.LocalEndPoint!);
        using var server = listen.Accept();
        server.NoDelay = true;

        byte[] send = new byte[BufferSize];
        Random.Shared.NextBytes(send); // incompressible, like the guest (not that TCP compresses)
        byte[] receive = new byte[BufferSize];
        Exception? senderError = null;
        ThreadCpu senderCpu = default;

        var sender = new Thread(() =>
        {
            var c0 = ThreadCpu.Now();
            try
            {
                long left = bytes;
                while (left > 0)
                {
                    int n = (int)Math.Min(left, send.Length);
                    int off = 0;
                    while (off < n) off += client.Send(send, off, n - off, SocketFlags.None);
                    left -= n;
                }
                client.Shutdown(SocketShutdown.Send);
            }
            catch (Exception e) { senderError = e; }
            senderCpu = ThreadCpu.Now() - c0;
        }) { IsBackground = true, Name = "plain-sender" };

        var r0 = ThreadCpu.Now();
        var p0 = Process.GetCurrentProcess().TotalProcessorTime;
        long t0 = Stopwatch.GetTimestamp();
        sender.Start();
        long received = 0, page = 0;
        while (received < bytes)
        {
            // Fill the 1 MiB array, then (variant 2) place it page by page.
            int fill = 0, want = (int)Math.Min(BufferSize, bytes - received);
            while (fill < want)
            {
                int n = server.Receive(receive, fill, want - fill, SocketFlags.None);
                if (n == 0) throw new IOException($"sender closed after {received + fill} of {bytes} bytes");
                fill += n;
            }
            received += fill;
            if (memory is not null)
            {
                for (int off = 0; off < fill; off += GuestMemory.PageSize)
                {
                    int len = Math.Min(GuestMemory.PageSize, fill - off);
                    receive.AsSpan(off, len).CopyTo(memory.Page(page++));
                }
            }
        }
        double seconds = Stopwatch.GetElapsedTime(t0).TotalSeconds;
        var receiverCpu = ThreadCpu.Now() - r0;
        sender.Join();
        double processCpu = (Process.GetCurrentProcess().TotalProcessorTime - p0).TotalSeconds;
        if (senderError is not null) throw new IOException("plain sender failed", senderError);
        return (seconds, senderCpu, receiverCpu, processCpu);
    }

    private static long RoundUpToPage(long b) => (b + GuestMemory.PageSize - 1) / GuestMemory.PageSize * GuestMemory.PageSize;
}
