using System.Net;
using System.Net.Sockets;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// A destination agent: accepts migrations on a TCP port, each on its own thread, and keeps
/// every VM that arrives running in its <see cref="Registry"/>, by unique name, until it is
/// destroyed or migrated onward.
/// </summary>
public sealed class MigrationListener : IDisposable
{
    private readonly TcpListener _listener;
    private readonly DestinationOptions _options;
    private readonly CancellationTokenSource _stop = new();
    /// <summary>This listener's migrations that later connections join (resume, post-copy, data streams): its own, shared with no other listener.</summary>
    private readonly DestinationSessions _sessions = new();
    private Thread? _acceptThread;

    public MigrationListener(IPAddress address, int port, DestinationOptions options)
    {
        _listener = new TcpListener(address, port);
        _options = options;
        Registry = new VmRegistry(options.Time);
    }

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    /// <summary>Raised on the migration's thread when a VM has arrived and runs here.</summary>
    public event Action<ArrivedVm>? Arrived;

    /// <summary>Raised when an incoming migration fails (its partial VM is already discarded).</summary>
    public event Action<MigrationFailedException>? Failed;

    /// <summary>The migrations in progress here that other connections may join.</summary>
    public DestinationSessions Sessions => _sessions;

    /// <summary>The VMs that arrived and run here, and the migrations in progress (list, stop, destroy, migrate onward).</summary>
    public VmRegistry Registry { get; }

    public IReadOnlyCollection<IVirtualMachine> Vms => Registry.Vms;

    public void Start()
    {
        _listener.Start();
        _acceptThread = new Thread(AcceptLoop) { IsBackground = true, Name = "livemig-accept" };
        _acceptThread.Start();
    }

    private void AcceptLoop()
    {
        while (!_stop.IsCancellationRequested)
        {
            TcpClient client;
            try { client = _listener.AcceptTcpClient(); }
            catch (SocketException) { return; }
            catch (ObjectDisposedException) { return; }
            client.NoDelay = true;
            new Thread(() => Handle(client)) { IsBackground = true, Name = "livemig-incoming" }.Start();
        }
    }

    private void Handle(TcpClient client)
    {
        using (client)
        {
            try
            {
                // Owns the socket: disposing the stream (e.g. post-copy closing a channel) aborts a blocked read.
                Stream stream = new NetworkStream(client.Client, ownsSocket: true);
                string? peer;
                try { stream = _options.Security.SecureServer(stream, _options.IoTimeout, out peer); }
                catch (AuthenticationFailedException e)
                {
                    stream.Dispose();
                    Failed?.Invoke(new MigrationFailedException(e.Message, new DestinationReport(_options).Build(e.Message), e));
                    return;
                }
                using var _ = stream;
                var arrived = new IncomingMigration(_options, _sessions, Registry).Receive(stream);
                if (arrived is null) return; // a second connection of a post-copy migration
                arrived = arrived with { Report = arrived.Report with { Peer = peer } };
                Arrived?.Invoke(arrived);
            }
            catch (MigrationFailedException e)
            {
                Failed?.Invoke(e);
            }
        }
    }

    public void Dispose()
    {
        _stop.Cancel();
        _listener.Stop();
        _acceptThread?.Join(TimeSpan.FromSeconds(5));
        Registry.Dispose();
    }
}
