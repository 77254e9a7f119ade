using System.Net.Sockets;
using System.Text.Json.Nodes;

namespace LiveMig.Qemu;

/// <summary>
/// QEMU's device-state migration (x-ignore-shared: device and vCPU state only) begun with
/// capability <c>pause-before-switchover</c>, so that QEMU's own save set-up — 10–20 ms here,
/// which used to be downtime — runs while the guest still runs. QEMU 7.2's source states:
/// setup → active (no RAM to send: it completes at once) → stops the guest → <c>pre-switchover</c>
/// (waits, set-up done, the stream's header already written) → <c>migrate-continue</c> →
/// device → completed (postmigrate). A <c>migrate_cancel</c> in pre-switchover restarts the guest
/// (QEMU does so itself when it was running at <c>migrate</c>), so a failure before the
/// destination runs leaves the source running. The ends are learnt from QMP's MIGRATION events
/// (capability <c>events</c>), not by polling.
/// </summary>
internal sealed class QemuDeviceStateSave : IDisposable
{
    private readonly QemuProcess _qemu;
    private readonly Socket _listener;
    private readonly string _path;
    private readonly TimeSpan _timeout;
    private Socket? _connection;
    // QEMU writes the non-shared RAM blocks (ROMs: about 0.45 MB for the Linux guest) before it
    // stops the guest: more than a Unix socket buffers, so the stream is read from the start, on a
    // thread of its own doing blocking reads (no asynchronous code to compile in the pause).
    private readonly Thread _reader;
    private readonly MemoryStream _state = new(1 << 20);
    private Exception? _readError;
    private volatile bool _ended;

    private QemuDeviceStateSave(QemuProcess qemu, string path, TimeSpan timeout)
    {
        _qemu = qemu;
        _path = path;
        _timeout = timeout;
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _listener.Bind(new UnixDomainSocketEndPoint(path));
        _listener.Listen(1);
        _reader = new Thread(ReadLoop) { IsBackground = true, Name = "qemu-device-state" };
        _reader.Start();
    }

    /// <summary>
    /// Starts the migration and returns once QEMU has stopped the guest and waits in
    /// pre-switchover. Null when QEMU ended its migration some other way (then nothing is left
    /// behind, and the caller stops the guest itself); QMP failures throw.
    /// </summary>
    public static QemuDeviceStateSave? BeginPaused(QemuProcess qemu, string path, TimeSpan timeout)
    {
        var save = new QemuDeviceStateSave(qemu, path, timeout);
        try
        {
            var paused = NextStatus(qemu, "pre-switchover", "completed", "failed", "cancelled");
            qemu.Qmp.Execute("migrate", new JsonObject { ["uri"] = "unix:" + path });
            string status = save.Wait(paused).Data?["status"]?.GetValue<string>() ?? "?";
            if (status != "pre-switchover") { save.Dispose(); return null; }
            return save;
        }
        catch
        {
            save.Dispose();
            throw;
        }
    }

    /// <summary>Lets QEMU save the device state (<c>migrate-continue</c>) and reads it to the end; QEMU is then in postmigrate.</summary>
    public byte[] Finish()
    {
        var ended = NextStatus(_qemu, "completed", "failed", "cancelled");
        _qemu.Qmp.Execute("migrate-continue", new JsonObject { ["state"] = "pre-switchover" });
        if (!_reader.Join(_timeout)) throw new QmpException($"QEMU did not save its device state within {_timeout.TotalSeconds:0.#} s{Gone()}");
        if (_readError is { } e) throw e;
        byte[] state = _state.ToArray();
        string status = Wait(ended).Data?["status"]?.GetValue<string>() ?? "?";
        if (status != "completed") throw new QmpException($"QEMU's device-state migration ended '{status}'{ErrorDesc()}");
        return state;
    }

    /// <summary>Gives up before the state was saved: QEMU cancels, and restarts the guest if it was running at <c>migrate</c>.</summary>
    public void Cancel()
    {
        var ended = NextStatus(_qemu, "cancelled", "failed", "completed");
        _qemu.Qmp.Execute("migrate_cancel");
        Wait(ended);
    }

    private string ErrorDesc() =>
        _qemu.Qmp.Execute("query-migrate") is JsonObject o && o["error-desc"]?.GetValue<string>() is { } e ? ": " + e : "";

    private static Task<QmpEvent> NextStatus(QemuProcess qemu, params string[] statuses) =>
        qemu.Qmp.NextEvent("MIGRATION", e => e.Data?["status"]?.GetValue<string>() is { } s && statuses.Contains(s));

    private T Wait<T>(Task<T> task)
    {
        try
        {
            if (!task.Wait(_timeout)) throw new QmpException($"QEMU's device-state migration did not get on within {_timeout.TotalSeconds:0.#} s{Gone()}");
            return task.Result;
        }
        catch (AggregateException e) when (e.InnerException is QmpException q) { throw q; }
    }

    private string Gone() => _qemu.ExitReason is { } gone ? $" (QEMU {gone})" : "";

    private void ReadLoop()
    {
        try
        {
            // In slices, so that a save given up before QEMU connected ends this thread soon.
            long deadline = Environment.TickCount64 + (long)_timeout.TotalMilliseconds;
            while (!_listener.Poll(TimeSpan.FromMilliseconds(100), SelectMode.SelectRead))
                if (_ended) return;
                else if (Environment.TickCount64 > deadline) throw new QmpException($"QEMU did not connect to {_path} for its device state{Gone()}");
            Volatile.Write(ref _connection, _listener.Accept());
            if (_ended) return;
            var buffer = new byte[256 << 10];
            while (true)
            {
                int n = _connection!.Receive(buffer);
                if (n == 0) return;
                _state.Write(buffer, 0, n);
                if (_state.Length > QemuVm.MaxStateBytes) throw new QmpException($"QEMU's device state exceeds {QemuVm.MaxStateBytes >> 20} MiB");
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException) { if (!_ended) _readError = new QmpException($"QEMU's device state could not be read from {_path}: {e.Message}{Gone()}", e); }
        catch (QmpException e) { _readError = e; }
    }

    public void Dispose()
    {
        _ended = true;
        try { Volatile.Read(ref _connection)?.Shutdown(SocketShutdown.Both); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        _reader.Join(TimeSpan.FromSeconds(2)); // its blocking read ends with the shutdown, its wait for QEMU within 100 ms
        Volatile.Read(ref _connection)?.Dispose();
        _listener.Dispose();
        try { File.Delete(_path); } catch (IOException) { }
    }
}
