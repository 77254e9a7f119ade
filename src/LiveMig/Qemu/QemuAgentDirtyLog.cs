using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Qemu;

/// <summary>
/// QEMU's writes found by the agent preloaded into QEMU (native/qemu_dirty_agent.c): it registers
/// QEMU's own mapping of the RAM file with userfaultfd asynchronous write-protect and answers each
/// harvest with the pages written since the last one (PAGEMAP_SCAN, which re-protects them), over
/// a Unix socket in the guest's run directory. Exact and cheap (a scan, no pass over memory); the
/// page-hash log is the fallback where the agent cannot work (<see cref="QemuDirtyLogChoice"/>).
/// </summary>
public sealed class QemuAgentDirtyLog(string socketPath, long pageCount, Func<string?> qemuGone) : IDirtyLog
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);
    private Socket? _socket;
    private readonly byte[] _head = new byte[9];
    private byte[] _ranges = new byte[16 * 4096];

    public string Name => "qemu-uffd-wp";
    public bool IsTracking { get; private set; }

    public void Start()
    {
        Close();
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = (int)Timeout.TotalMilliseconds, SendTimeout = (int)Timeout.TotalMilliseconds };
        try { s.Connect(new UnixDomainSocketEndPoint(socketPath)); }
        catch (SocketException e) { s.Dispose(); throw Failed($"cannot reach the dirty-page agent in QEMU at {socketPath}: {e.Message}"); }
        _socket = s;
        long pages = Request((byte)'S');
        if (pages != pageCount) { Close(); throw Failed($"the agent in QEMU tracks {pages} pages, the guest has {pageCount}"); }
        IsTracking = true;
    }

    public long Harvest(PageBitmap into)
    {
        if (!IsTracking) return 0;
        Send((byte)'H');
        long total = 0;
        while (true)
        {
            long n = ReadAnswer();
            if (n == 0) return total;
            if (n > 1 << 20) throw Failed($"the agent in QEMU announced {n} ranges");
            int bytes = checked((int)n * 16);
            if (_ranges.Length < bytes) _ranges = new byte[bytes];
            ReadExactly(_ranges.AsSpan(0, bytes));
            for (int i = 0; i < n; i++)
            {
                long first = (long)BinaryPrimitives.ReadUInt64LittleEndian(_ranges.AsSpan(16 * i));
                long count = (long)BinaryPrimitives.ReadUInt64LittleEndian(_ranges.AsSpan(16 * i + 8));
                if (first < 0 || count <= 0 || first + count > pageCount) throw Failed($"the agent in QEMU reported pages {first}+{count} outside the guest's {pageCount}");
                into.SetRange(first, count);
                total += count;
            }
        }
    }

    public void Stop()
    {
        if (!IsTracking) { Close(); return; }
        IsTracking = false;
        try { Request((byte)'X'); }
        catch (VmFailedException) { } // QEMU is gone, or going: nothing is tracked any more either way
        Close();
    }

    public void Dispose() => Stop();

    private long Request(byte command)
    {
        Send(command);
        return ReadAnswer();
    }

    private void Send(byte command)
    {
        try { (_socket ?? throw Failed("the dirty-page agent is not connected")).Send([command]); }
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { throw Failed($"the dirty-page agent in QEMU: {e.Message}"); }
    }

    /// <summary>One answer's header; its n (an error's text is read and thrown).</summary>
    private long ReadAnswer()
    {
        ReadExactly(_head);
        long n = (long)BinaryPrimitives.ReadUInt64LittleEndian(_head.AsSpan(1));
        if (_head[0] == (byte)'O') return n;
        if (_head[0] != (byte)'E' || n > 4096) throw Failed("the dirty-page agent in QEMU sent a malformed answer");
        var text = new byte[n];
        ReadExactly(text);
        throw Failed($"the dirty-page agent in QEMU: {Encoding.UTF8.GetString(text).ReplaceLineEndings(" ")}");
    }

    private void ReadExactly(Span<byte> into)
    {
        var s = _socket ?? throw Failed("the dirty-page agent is not connected");
        try
        {
            while (!into.IsEmpty)
            {
                int n = s.Receive(into);
                if (n == 0) throw Failed("the dirty-page agent in QEMU closed its socket");
                into = into[n..];
            }
        }
        catch (SocketException e) { throw Failed($"the dirty-page agent in QEMU: {e.Message}"); }
    }

    private VmFailedException Failed(string why) => new(qemuGone() is { } gone ? gone : why);

    private void Close()
    {
        _socket?.Dispose();
        _socket = null;
    }
}

/// <summary>Which dirty log a QEMU guest uses: the agent in QEMU where it works, else page hashes.</summary>
public enum QemuDirtyLog
{
    /// <summary>The agent (userfaultfd write-protect inside QEMU) when it starts; page hashes otherwise, with a note saying why.</summary>
    Auto,
    /// <summary>The agent, or fail.</summary>
    Agent,
    /// <summary>Page hashes (needs nothing).</summary>
    PageHash,
}

/// <summary>Chooses a QEMU guest's dirty log by trying the agent once (start, then stop: the guest sees nothing of it).</summary>
internal static class QemuDirtyLogChoice
{
    public static IDirtyLog Choose(QemuProcess qemu, GuestMemory memory, QemuDirtyLog kind, Func<string?> gone, out string? note)
    {
        note = null;
        if (kind != QemuDirtyLog.PageHash)
        {
            string? why = qemu.AgentSocket is null ? "the agent library (liblivemig_qemu_agent.so, built with gcc) is not next to LiveMig"
                // KVM vCPUs write through the EPT: that the agent's write-protect sees every such write is untested (docs/qemu.md).
                : qemu.Spec.Accel == "kvm" && kind == QemuDirtyLog.Auto ? "under KVM the agent is untested" : null;
            if (why is null)
            {
                var agent = new QemuAgentDirtyLog(qemu.AgentSocket!, memory.PageCount, gone);
                try
                {
                    agent.Start();
                    agent.Stop();
                    return agent;
                }
                catch (VmFailedException e) { why = e.Message; }
            }
            if (kind == QemuDirtyLog.Agent) throw new VmFailedException($"QEMU's dirty-page agent is unavailable: {why}");
            note = $"QEMU's dirty-page agent is unavailable ({why}); comparing page hashes instead";
        }
        return new PageHashDirtyLog(memory, gone);
    }
}
