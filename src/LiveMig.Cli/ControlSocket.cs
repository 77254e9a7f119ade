using System.Net.Sockets;
using System.Text;
using LiveMig.Transport;

namespace LiveMig.Cli;

/// <summary>
/// A running `livemig migrate` listens on a unix socket for one-line commands from
/// `livemig cancel`, `livemig set-bandwidth`, `livemig migrate --resume` and `livemig destroy`: <c>cancel</c>,
/// <c>bandwidth RATE</c>, <c>resume ID [HOST:PORT [restart]]</c>, <c>destroy ID</c>. Each gets a one-line answer. Local only (file permissions guard it), so no authentication on top.
/// </summary>
internal sealed class ControlSocket : IDisposable
{
    private readonly Socket _listener;
    private readonly string _path;
    private readonly Func<string> _cancel;
    private readonly RateLimiter _limiter;
    private readonly Func<string, string> _resume;
    private readonly Func<string, string> _destroy;
    private readonly Thread _thread;

    /// <param name="cancel">Cancels the migration unless its switch-over has begun; returns the answer to print.</param>
    public ControlSocket(string path, Func<string> cancel, RateLimiter limiter, Func<string, string> resume, Func<string, string> destroy)
    {
        _destroy = destroy;
        _path = path;
        _cancel = cancel;
        _limiter = limiter;
        _resume = resume;
        if (File.Exists(path)) File.Delete(path);
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _listener.Bind(new UnixDomainSocketEndPoint(path));
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        _listener.Listen(4);
        _thread = new Thread(Serve) { IsBackground = true, Name = "livemig-control" };
        _thread.Start();
    }

    public static string DefaultPath => Path.Combine(Path.GetTempPath(), "livemig-migrate.sock");

    private void Serve()
    {
        while (true)
        {
            Socket s;
            try { s = _listener.Accept(); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { return; }
            using (s)
            using (var stream = new NetworkStream(s))
            using (var reader = new StreamReader(stream, Encoding.UTF8))
            using (var writer = new StreamWriter(stream, Encoding.UTF8) { AutoFlush = true })
            {
                try
                {
                    string line = (reader.ReadLine() ?? "").Trim();
                    writer.WriteLine(Handle(line));
                }
                catch (IOException) { }
            }
        }
    }

    private string Handle(string line)
    {
        string[] parts = line.Split(' ', 2, StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        switch (parts.FirstOrDefault())
        {
            case "cancel":
                return _cancel();
            case "bandwidth" when parts.Length == 2:
                if (!Units.TryParseRate(parts[1], out long rate)) return $"error: bandwidth '{parts[1]}': expected a rate such as 100MiB/s or unlimited";
                _limiter.BytesPerSecond = rate;
                return $"ok: bandwidth {(rate == 0 ? "unlimited" : Units.Rate(rate))}";
            case "resume" when parts.Length == 2:
                return _resume(parts[1]);
            case "destroy" when parts.Length == 2:
                return _destroy(parts[1]);
            default:
                return $"error: unknown command '{line}' (cancel, bandwidth RATE, resume ID [HOST:PORT [restart]], destroy ID)";
        }
    }

    /// <summary>Client side: sends one command, returns the answer.</summary>
    public static string Send(string path, string command)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try { s.Connect(new UnixDomainSocketEndPoint(path)); }
        catch (SocketException e) { throw new UsageException($"--control {path}: no migration is listening there ({e.Message})"); }
        using var stream = new NetworkStream(s);
        using var writer = new StreamWriter(stream, Encoding.UTF8) { AutoFlush = true };
        using var reader = new StreamReader(stream, Encoding.UTF8);
        writer.WriteLine(command);
        return reader.ReadLine() ?? "error: no answer";
    }

    public void Dispose()
    {
        _listener.Dispose();
        try { File.Delete(_path); } catch (IOException) { }
    }
}
