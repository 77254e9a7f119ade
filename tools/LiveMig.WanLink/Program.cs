using System.Diagnostics;
using System.Runtime.InteropServices;

namespace LiveMig.WanLink;

/// <summary>
/// A userspace WAN link for the network testbed: this kernel has no netem, so latency and loss
/// come from here. Two TUN devices are made in the current namespace and moved into the two
/// testbed namespaces (their file descriptors stay ours); every packet read from one is held
/// for the one-way delay, dropped with the loss probability (seeded), and written to the other.
/// Rate shaping stays with tc (tbf) on the TUN devices.
///
///   LiveMig.WanLink --delay-ms 25 [--loss 0.001] [--seed 1] [--ns-a lm-src --ns-b lm-dst]
///                   [--ip-a 10.78.0.1 --ip-b 10.78.0.2]
/// Prints "ready" when both ends are up; runs until killed.
/// </summary>
public static unsafe partial class Program
{
    private const ulong TUNSETIFF = 0x400454CA;
    private const short IFF_TUN = 0x0001, IFF_NO_PI = 0x1000;

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags);
    [LibraryImport("libc", SetLastError = true)]
    private static partial int ioctl(int fd, ulong request, void* arg);
    [LibraryImport("libc", SetLastError = true)]
    private static partial nint read(int fd, void* buf, nuint count);
    [LibraryImport("libc", SetLastError = true)]
    private static partial nint write(int fd, void* buf, nuint count);

    public static int Main(string[] args)
    {
        string Arg(string name, string fallback) { int i = Array.IndexOf(args, name); return i >= 0 && i + 1 < args.Length ? args[i + 1] : fallback; }
        double delayMs = double.Parse(Arg("--delay-ms", "25"), System.Globalization.CultureInfo.InvariantCulture);
        double loss = double.Parse(Arg("--loss", "0"), System.Globalization.CultureInfo.InvariantCulture);
        int seed = int.Parse(Arg("--seed", "1"));
        string nsA = Arg("--ns-a", "lm-src"), nsB = Arg("--ns-b", "lm-dst");
        string ipA = Arg("--ip-a", "10.78.0.1"), ipB = Arg("--ip-b", "10.78.0.2");
        if (delayMs < 0 || loss is < 0 or >= 1) { Console.Error.WriteLine("wanlink: --delay-ms must be >= 0 and --loss in [0, 1)"); return 2; }

        int a = OpenTun("lmwan-a"), b = OpenTun("lmwan-b");
        Setup("lmwan-a", nsA, ipA, ipB);
        Setup("lmwan-b", nsB, ipB, ipA);
        long delayTicks = (long)(delayMs * Stopwatch.Frequency / 1000);
        var t1 = new Thread(() => Pump(a, b, delayTicks, loss, seed)) { IsBackground = true, Name = "a->b" };
        var t2 = new Thread(() => Pump(b, a, delayTicks, loss, seed + 1)) { IsBackground = true, Name = "b->a" };
        t1.Start(); t2.Start();
        Console.WriteLine("ready");
        Console.Out.Flush();
        t1.Join();
        return 0;
    }

    private static int OpenTun(string name)
    {
        int fd = open("/dev/net/tun", 2 /* O_RDWR */);
        if (fd < 0) throw new IOException($"open /dev/net/tun: errno {Marshal.GetLastPInvokeError()}");
        byte* ifr = stackalloc byte[40];
        new Span<byte>(ifr, 40).Clear();
        System.Text.Encoding.ASCII.GetBytes(name, new Span<byte>(ifr, 15));
        *(short*)(ifr + 16) = IFF_TUN | IFF_NO_PI;
        if (ioctl(fd, TUNSETIFF, ifr) != 0) throw new IOException($"TUNSETIFF {name}: errno {Marshal.GetLastPInvokeError()}");
        return fd;
    }

    private static void Setup(string dev, string ns, string local, string peer)
    {
        Sh("ip", "link", "set", dev, "netns", ns);
        Sh("ip", "netns", "exec", ns, "ip", "addr", "add", local, "peer", peer, "dev", dev);
        Sh("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up", "mtu", "1500");
    }

    private static void Sh(string file, params string[] args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardError = true };
        foreach (var x in args) psi.ArgumentList.Add(x);
        using var p = Process.Start(psi)!;
        string err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        if (p.ExitCode != 0) throw new IOException($"{file} {string.Join(' ', args)}: {err.Trim()}");
    }

    /// <summary>Reader: stamp each packet with its due time; writer: release packets when due (FIFO: the delay is constant).</summary>
    private static void Pump(int from, int to, long delayTicks, double loss, int seed)
    {
        var queue = new Queue<(long Due, byte[] Packet, int Length)>();
        var gate = new object();
        var pool = new Stack<byte[]>();
        var writer = new Thread(() =>
        {
            while (true)
            {
                (long Due, byte[] Packet, int Length) item;
                lock (gate)
                {
                    while (queue.Count == 0) Monitor.Wait(gate);
                    item = queue.Peek();
                }
                long wait = item.Due - Stopwatch.GetTimestamp();
                if (wait > 0)
                {
                    double ms = wait * 1000.0 / Stopwatch.Frequency;
                    if (ms >= 1) Thread.Sleep((int)ms); else Thread.SpinWait(50);
                    continue;
                }
                lock (gate) queue.Dequeue();
                fixed (byte* p = item.Packet) write(to, p, (nuint)item.Length);
                lock (gate) pool.Push(item.Packet);
            }
        }) { IsBackground = true };
        writer.Start();
        var rng = new Random(seed);
        while (true)
        {
            byte[] buf;
            lock (gate) buf = pool.Count > 0 ? pool.Pop() : new byte[65536];
            nint n;
            fixed (byte* p = buf) n = read(from, p, (nuint)buf.Length);
            if (n <= 0) { if (Marshal.GetLastPInvokeError() == 4) continue; return; }
            if (loss > 0 && rng.NextDouble() < loss) { lock (gate) pool.Push(buf); continue; }
            lock (gate)
            {
                queue.Enqueue((Stopwatch.GetTimestamp() + delayTicks, buf, (int)n));
                Monitor.Pulse(gate);
            }
        }
    }
}
