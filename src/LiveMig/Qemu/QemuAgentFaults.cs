using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using LiveMig.Linux;
using LiveMig.Memory;
using LiveMig.Vm;

namespace LiveMig.Qemu;

/// <summary>
/// Post-copy's demand paging for a QEMU guest, LiveMig's side of the agent's 'U' and 'R'
/// (native/qemu_dirty_agent.c): the agent in the destination QEMU registers QEMU's own mapping
/// of the RAM file with userfaultfd (MISSING) and passes the descriptor over its Unix socket
/// (SCM_RIGHTS); LiveMig's native fault loop serves QEMU's faults with it
/// (<see cref="UffdDemandPager"/> over <see cref="RemoteFaults"/>). The faulting threads are
/// QEMU's, so a .NET garbage collection can never be part of a fault's wait cycle.
/// </summary>
internal static unsafe class QemuAgentFaults
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(10);

    /// <summary>Registers the destination QEMU's RAM mapping and takes the descriptor; a <see cref="VmFailedException"/> saying why when it cannot.</summary>
    public static RemoteFaults Open(QemuProcess qemu, long memoryBytes)
    {
        if (qemu.AgentSocket is null)
            throw new VmFailedException("post-copy of a QEMU guest needs LiveMig's agent in the destination QEMU (liblivemig_qemu_agent.so, built with gcc), which is not next to LiveMig");
        string? Gone() => qemu.ExitReason is { } gone ? $"destination QEMU (pid {qemu.Pid}) {gone}" : null;
        VmFailedException Failed(string why) => new(Gone() ?? $"the agent in the destination QEMU: {why}");
        using var s = Connect(qemu.AgentSocket, Failed);
        try
        {
            s.Send([(byte)'U']);
            var head = new byte[9];
            int fd = ReceiveWithDescriptor(s, head, Failed);
            try
            {
                long n = (long)BinaryPrimitives.ReadUInt64LittleEndian(head.AsSpan(1));
                if (head[0] == (byte)'E' && n <= 4096)
                {
                    var text = new byte[n];
                    ReadExactly(s, text, Failed);
                    throw Failed(Encoding.UTF8.GetString(text).ReplaceLineEndings(" "));
                }
                if (head[0] != (byte)'O' || n != 2) throw Failed("a malformed answer to 'U'");
                if (fd < 0) throw Failed("no userfaultfd came with the answer");
                var payload = new byte[16];
                ReadExactly(s, payload, Failed);
                ulong address = BinaryPrimitives.ReadUInt64LittleEndian(payload);
                long length = (long)BinaryPrimitives.ReadUInt64LittleEndian(payload.AsSpan(8));
                if (length != memoryBytes) throw Failed($"QEMU's RAM mapping is {length} bytes, the guest {memoryBytes}");
                var faults = new RemoteFaults(fd, address, length, () => GoneAfterPlacementFailed(qemu, Gone), () => Release(qemu));
                fd = -1;
                return faults;
            }
            finally
            {
                if (fd >= 0) Native.close(fd);
            }
        }
        catch (SocketException e) { throw Failed(e.Message); }
    }

    /// <summary>
    /// Asked when a placement found QEMU's address space gone (ESRCH): QEMU is exiting, but its exit
    /// may not be observable yet — a moment's wait, so the failure names how it ended.
    /// </summary>
    private static string? GoneAfterPlacementFailed(QemuProcess qemu, Func<string?> gone)
    {
        qemu.WaitForExit(TimeSpan.FromSeconds(2));
        return gone();
    }

    /// <summary>Every page has arrived: the agent unregisters the range and closes its copy of the descriptor. Best effort (QEMU may be gone).</summary>
    private static void Release(QemuProcess qemu)
    {
        if (qemu.AgentSocket is null || qemu.ExitReason is not null) return;
        try
        {
            using var s = Connect(qemu.AgentSocket, why => new VmFailedException(why));
            s.Send([(byte)'R']);
            ReadExactly(s, new byte[9], why => new VmFailedException(why));
        }
        catch (Exception e) when (e is SocketException or VmFailedException) { } // already unregistered from here (UffdDemandPager.Stop)
    }

    private static Socket Connect(string path, Func<string, VmFailedException> failed)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = (int)Timeout.TotalMilliseconds, SendTimeout = (int)Timeout.TotalMilliseconds };
        try { s.Connect(new UnixDomainSocketEndPoint(path)); }
        catch (SocketException e) { s.Dispose(); throw failed($"cannot reach it at {path}: {e.Message}"); }
        return s;
    }

    /// <summary>Reads <paramref name="head"/> whole; the descriptor passed with its first bytes, or -1.</summary>
    private static int ReceiveWithDescriptor(Socket s, byte[] head, Func<string, VmFailedException> failed)
    {
        if (!s.Poll(Timeout, SelectMode.SelectRead)) throw failed($"no answer within {Timeout.TotalSeconds:0} s");
        byte* control = stackalloc byte[Native.CmsgOneFdSpace];
        new Span<byte>(control, Native.CmsgOneFdSpace).Clear();
        long got;
        fixed (byte* p = head)
        {
            var iov = new Native.IoVec { Base = p, Length = (nuint)head.Length };
            var msg = new Native.MsgHdr { Iov = &iov, IovLength = 1, Control = control, ControlLength = Native.CmsgOneFdSpace };
            do got = Native.recvmsg((int)s.Handle, &msg, Native.MSG_CMSG_CLOEXEC);
            while (got < 0 && Native.Errno == Native.EINTR);
            if (got < 0) throw failed($"recvmsg: {Native.ErrorText(Native.Errno)}");
            if (got == 0) throw failed("it closed its socket");
        }
        int fd = -1;
        long cmsgLength = *(long*)control;
        if (cmsgLength >= Native.CmsgHeaderLength + 4 && *(int*)(control + 8) == Native.SOL_SOCKET && *(int*)(control + 12) == Native.SCM_RIGHTS)
            fd = *(int*)(control + Native.CmsgHeaderLength);
        try { ReadExactly(s, head.AsSpan((int)got), failed); }
        catch { if (fd >= 0) Native.close(fd); throw; }
        return fd;
    }

    private static void ReadExactly(Socket s, Span<byte> into, Func<string, VmFailedException> failed)
    {
        while (!into.IsEmpty)
        {
            int n = s.Receive(into);
            if (n == 0) throw failed("it closed its socket");
            into = into[n..];
        }
    }
}
