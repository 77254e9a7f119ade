using System.Net.Sockets;
using System.Text;
using LiveMig.Transport;

namespace LiveMig.Cli;

/// <summary>
/// A unix control socket of a running <c>livemig migrate</c> or <c>livemig listen</c>: each
/// connection sends one command line and reads answer lines until the server closes it (one
/// line for most commands; a migration started on an agent streams its progress, then its
/// report). Text, so that a shell (<c>socat</c>) can drive it too. The socket is this process's
/// alone (<see cref="ExclusiveUnixSocket"/>: a live path is refused, a stale one replaced, only
/// its own file deleted) and local to this user (mode 0600), so no authentication on top.
/// </summary>
internal sealed class ControlSocket : IDisposable
{
    private readonly ExclusiveUnixSocket _socket;
    private readonly Thread _thread;
    private volatile Action<string, TextWriter> _handler = (_, w) => w.WriteLine("error: not ready yet; try again in a moment");

    private ControlSocket(ExclusiveUnixSocket socket)
    {
        _socket = socket;
        _thread = new Thread(AcceptLoop) { IsBackground = true, Name = "livemig-control" };
        _thread.Start();
    }

    /// <summary>The default of <c>migrate --control</c> (and of <c>cancel</c>, <c>set-bandwidth</c>, <c>migrate --resume</c>).</summary>
    public static string DefaultMigratePath => System.IO.Path.Combine(System.IO.Path.GetTempPath(), "livemig-migrate.sock");

    /// <summary>The default of <c>listen --control</c> for an agent on <paramref name="port"/>: two agents on one host do not collide.</summary>
    public static string AgentPath(int port) => System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"livemig-agent-{port}.sock");

    /// <summary>The agent on the default port, which <c>list</c>, <c>stop</c>, <c>destroy</c>, … ask unless given <c>--control</c>.</summary>
    public static string DefaultAgentPath => AgentPath(7480);

    public string Path => _socket.Path;

    /// <summary>Binds the socket (a one-line usage error when the path is live or unusable) and answers "not ready" until <see cref="Handler"/> is set.</summary>
    public static ControlSocket Open(string path)
    {
        try { return new ControlSocket(ExclusiveUnixSocket.Bind(path)); }
        catch (IOException e) { throw new UsageException($"--control {e.Message}"); }
    }

    /// <summary>Answers one command line by writing answer lines.</summary>
    public Action<string, TextWriter> Handler { set => _handler = value; }

    private void AcceptLoop()
    {
        while (true)
        {
            Socket s;
            try { s = _socket.Socket.Accept(); } catch (Exception e) when (e is SocketException or ObjectDisposedException) { return; }
            // A thread a connection: a migration started on an agent holds its connection while it runs.
            new Thread(() => Serve(s)) { IsBackground = true, Name = "livemig-control-conn" }.Start();
        }
    }

    private void Serve(Socket s)
    {
        try
        {
            // Everything inside: a client that hung up makes even the writer's final flush throw.
            using var stream = new NetworkStream(s, ownsSocket: true);
            using var reader = new StreamReader(stream, Encoding.UTF8);
            using var writer = new StreamWriter(stream, Encoding.UTF8) { AutoFlush = true };
            s.ReceiveTimeout = 10_000; // for the command line only: a client that says nothing does not hold a thread
            string? line = reader.ReadLine();
            if (string.IsNullOrWhiteSpace(line)) return; // a liveness probe (ExclusiveUnixSocket.IsLive), or nothing said
            s.ReceiveTimeout = 0;
            try { _handler(line.Trim(), writer); }
            catch (Exception e) when (e is not (IOException or SocketException or ObjectDisposedException))
            {
                // A command that fails in a way nobody foresaw must not take this process down, nor the VMs it holds.
                writer.WriteLine($"error: {e.GetType().Name}: {e.Message.ReplaceLineEndings(" ")}");
            }
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException) { }
    }

    /// <summary>Client side: sends one command, returns the first answer line.</summary>
    public static string Send(string path, string command) => Converse(path, command).FirstOrDefault() ?? "error: no answer";

    /// <summary>Client side: sends one command and yields the answer lines as they come, until the server closes.</summary>
    public static IEnumerable<string> Converse(string path, string command)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try { s.Connect(new UnixDomainSocketEndPoint(path)); }
        catch (SocketException e) { throw new UsageException($"--control {path}: nothing is listening there ({e.Message})"); }
        catch (ArgumentException) { throw new UsageException($"--control {path}: too long for a unix socket path"); }
        using var stream = new NetworkStream(s);
        using var writer = new StreamWriter(stream, Encoding.UTF8) { AutoFlush = true };
        using var reader = new StreamReader(stream, Encoding.UTF8);
        writer.WriteLine(command);
        for (string? line; (line = ReadLine(reader, path)) is not null;) yield return line;
    }

    private static string? ReadLine(StreamReader reader, string path)
    {
        try { return reader.ReadLine(); }
        catch (IOException e) { throw new UsageException($"--control {path}: the connection broke ({e.InnerException?.Message ?? e.Message})"); }
    }

    public void Dispose()
    {
        _socket.Dispose();
        _thread.Join(TimeSpan.FromSeconds(1));
    }
}

/// <summary>A writer for answer lines whose reader may hang up: a write that fails is dropped, never thrown into the migration that writes progress.</summary>
internal sealed class LinesToPeer(TextWriter inner) : TextWriter
{
    private readonly Lock _lock = new();
    private bool _broken;

    public override Encoding Encoding => inner.Encoding;

    public override void Write(char value) => Guarded(() => inner.Write(value));
    public override void Write(string? value) => Guarded(() => inner.Write(value));
    public override void WriteLine(string? value) => Guarded(() => inner.WriteLine(value));

    private void Guarded(Action write)
    {
        lock (_lock)
        {
            if (_broken) return;
            try { write(); }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException) { _broken = true; }
        }
    }
}
