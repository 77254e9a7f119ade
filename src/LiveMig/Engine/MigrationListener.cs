using LiveMig.Protocol;
using System.Net;
using System.Net.Sockets;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// A destination agent: accepts migrations on a TCP port and keeps every VM that arrives
/// running in its <see cref="Registry"/>, by unique name, until it is destroyed or migrated
/// onward. Connections are accepted and taken through their handshake asynchronously
/// (<see cref="HandshakeGate"/>: bounded in number and in time, no thread per connection);
/// each established connection then runs on a thread of its own. All its migrations share the
/// options' <see cref="DestinationOptions.MemoryBudget"/>.
/// </summary>
public sealed class MigrationListener : IDisposable
{
    private readonly TcpListener _listener;
    private readonly DestinationOptions _options;
    private readonly CancellationTokenSource _stop = new();
    /// <summary>This listener's migrations that later connections join (resume, post-copy, data streams): its own, shared with no other listener.</summary>
    private readonly DestinationSessions _sessions = new();
    private readonly HandshakeGate _gate;
    private Task? _accepting;

    public MigrationListener(IPAddress address, int port, DestinationOptions options)
    {
        _listener = new TcpListener(address, port);
        _options = options;
        Registry = new VmRegistry(options.Time);
        _gate = new HandshakeGate(options, why => Dropped?.Invoke(why), why => Failed?.Invoke(new MigrationFailedException(why, new DestinationReport(options).Build(why))));
    }

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    /// <summary>Raised on the migration's thread when a VM has arrived and runs here.</summary>
    public event Action<ArrivedVm>? Arrived;

    /// <summary>Raised when an incoming migration fails (its partial VM is already discarded), or a source is refused in its handshake (TLS, trust list).</summary>
    public event Action<MigrationFailedException>? Failed;

    /// <summary>
    /// Raised, one line each, when a connection is dropped at the handshake deadline, and when
    /// connections start and stop being refused because too many are in their handshake.
    /// </summary>
    public event Action<string>? Dropped;

    /// <summary>The migrations in progress here that other connections may join.</summary>
    public DestinationSessions Sessions => _sessions;

    /// <summary>The VMs that arrived and run here, and the migrations in progress (list, stop, destroy, migrate onward).</summary>
    public VmRegistry Registry { get; }

    public IReadOnlyCollection<IVirtualMachine> Vms => Registry.Vms;

    /// <summary>The memory all incoming VMs share (reserved at Hello, given back when a migration fails or its VM leaves).</summary>
    public MemoryBudget MemoryBudget => _options.MemoryBudget;

    /// <summary>Connections in their handshake now; refused because too many were; dropped at the deadline.</summary>
    public (int InProgress, long Refused, long Expired) Handshakes => (_gate.InProgress, _gate.Refused, _gate.Expired);

    public void Start()
    {
        _listener.Start();
        _accepting = AcceptAsync();
    }

    private async Task AcceptAsync()
    {
        while (true)
        {
            Socket socket;
            try { socket = await _listener.AcceptSocketAsync(_stop.Token); }
            catch (Exception e) when (e is SocketException or ObjectDisposedException or OperationCanceledException or InvalidOperationException) { return; } // stopped
            socket.NoDelay = true;
            _ = HandshakeThenRun(socket);
        }
    }

    /// <summary>The handshake on no thread; the established connection on a thread of its own.</summary>
    private async Task HandshakeThenRun(Socket socket)
    {
        OpenedConnection? opened;
        try { opened = await _gate.OpenAsync(socket, _stop.Token); }
        catch (Exception e) // nobody awaits this task: an unforeseen failure still closes the socket and is said
        {
            socket.Dispose();
            Failed?.Invoke(new MigrationFailedException($"handshake failed: {e.Message}", new DestinationReport(_options).Build(e.Message), e));
            return;
        }
        if (opened is null) return;
        new Thread(() => Handle(opened)) { IsBackground = true, Name = "livemig-incoming" }.Start();
    }

    private void Handle(OpenedConnection opened)
    {
        // Owns the socket: disposing the stream (e.g. post-copy closing a channel) aborts a blocked read.
        using var stream = opened.Stream;
        try
        {
            var arrived = new IncomingMigration(_options, _sessions, Registry).Receive(stream);
            if (arrived is null) return; // a second connection of a post-copy migration
            arrived = arrived with { Report = arrived.Report with { Peer = opened.Peer } };
            try { Arrived?.Invoke(arrived); }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // A subscriber's fault must not take the agent down with every VM it holds; the VM stays.
                Dropped?.Invoke($"the handler of VM {PeerText.Escape(arrived.Report.VmName)}'s arrival failed: {e.GetType().Name}: {PeerText.Escape(e.Message)}");
            }
        }
        catch (MigrationFailedException e)
        {
            Failed?.Invoke(e);
        }
    }

    public void Dispose()
    {
        _stop.Cancel();
        _listener.Stop();
        _accepting?.Wait(TimeSpan.FromSeconds(5));
        Registry.Dispose();
    }
}
