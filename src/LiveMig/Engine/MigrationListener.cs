using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// A destination agent: accepts migrations on a TCP port and keeps every VM that arrives
/// running (so it can be migrated onward). Connections are accepted and taken through their
/// handshake asynchronously (<see cref="HandshakeGate"/>: bounded in number and in time, no
/// thread per connection); each established connection then runs on a thread of its own.
/// </summary>
public sealed class MigrationListener : IDisposable
{
    private readonly TcpListener _listener;
    private readonly DestinationOptions _options;
    private readonly ConcurrentDictionary<string, IVirtualMachine> _vms = new();
    /// <summary>Each arrived VM's share of the memory budget, by migration id, given back when the VM goes.</summary>
    private readonly ConcurrentDictionary<string, MemoryBudget.Reservation> _budgets = new();
    private readonly CancellationTokenSource _stop = new();
    /// <summary>This listener's migrations that later connections join (resume, post-copy, data streams): its own, shared with no other listener.</summary>
    private readonly DestinationSessions _sessions = new();
    private readonly HandshakeGate _gate;
    private Task? _accepting;

    public MigrationListener(IPAddress address, int port, DestinationOptions options)
    {
        _listener = new TcpListener(address, port);
        _options = options;
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

    public IReadOnlyCollection<IVirtualMachine> Vms => (IReadOnlyCollection<IVirtualMachine>)_vms.Values;

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
        if (await _gate.OpenAsync(socket, _stop.Token) is not { } opened) return;
        new Thread(() => Handle(opened)) { IsBackground = true, Name = "livemig-incoming" }.Start();
    }

    private void Handle(OpenedConnection opened)
    {
        // Owns the socket: disposing the stream (e.g. post-copy closing a channel) aborts a blocked read.
        using var stream = opened.Stream;
        try
        {
            var arrived = new IncomingMigration(_options, _sessions).Receive(stream);
            if (arrived is null) return; // a second connection of a post-copy migration
            arrived = arrived with { Report = arrived.Report with { Peer = opened.Peer } };
            string id = arrived.Report.MigrationId;
            _vms[id] = arrived.Vm;
            if (arrived.Budget is not null) _budgets[id] = arrived.Budget;
            Arrived?.Invoke(arrived);
        }
        catch (MigrationFailedException e)
        {
            Failed?.Invoke(e);
        }
    }

    /// <summary>Drops the VM that arrived by migration <paramref name="migrationId"/>: stops it, frees its memory and gives its share of the memory budget back. False when there is none.</summary>
    public bool Discard(string migrationId)
    {
        if (!_vms.TryRemove(migrationId, out var vm)) return false;
        vm.Dispose();
        if (_budgets.TryRemove(migrationId, out var budget)) budget.Dispose();
        return true;
    }

    public void Dispose()
    {
        _stop.Cancel();
        _listener.Stop();
        _accepting?.Wait(TimeSpan.FromSeconds(5));
        foreach (string id in _vms.Keys) Discard(id);
    }
}
