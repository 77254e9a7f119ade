using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;

namespace LiveMig.Workloads;

/// <summary>
/// The VM's network address: a TCP listener on 127.0.0.1 that delivers each request to the kv
/// workload of whichever VM currently owns the address. <see cref="Attach"/> moves the address
/// (like the gratuitous ARP after a migration) and hands the old VM's unserved requests to the
/// new one, as the network would redeliver them. Requests wait while no VM is attached or the VM
/// is paused, up to <see cref="RequestTimeout"/>, then get <see cref="KvStatus.Unavailable"/>.
/// One thread per connection, blocking I/O: few clients, and the latency is easy to reason about.
/// </summary>
public sealed class KvEndpoint : IDisposable
{
    public const int MaxConnections = 64;

    private readonly Socket _listener;
    private readonly Thread _acceptThread;
    private readonly CancellationTokenSource _stop = new();
    // Guards _target, _orphans, and every enqueue, so Attach never strands a request in a VM it left.
    private readonly Lock _routeLock = new();
    private KvWorkload? _target;
    private readonly List<KvRequest> _orphans = [];
    private readonly Lock _connLock = new();
    private readonly HashSet<Socket> _connections = [];
    private readonly List<Thread> _threads = [];
    private long _accepted, _rejected, _served, _timedOut;

    public KvEndpoint(int port = 0, TimeSpan? requestTimeout = null)
    {
        RequestTimeout = requestTimeout ?? TimeSpan.FromSeconds(30);
        _listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            _listener.Bind(new IPEndPoint(IPAddress.Loopback, port));
            _listener.Listen(16);
        }
        catch
        {
            _listener.Dispose();
            throw;
        }
        EndPoint = (IPEndPoint)_listener.LocalEndPoint!;
        _acceptThread = new Thread(AcceptLoop) { IsBackground = true, Name = "kv-endpoint-accept" };
        _acceptThread.Start();
    }

    public IPEndPoint EndPoint { get; }
    public TimeSpan RequestTimeout { get; }
    public KvWorkload? Target { get { lock (_routeLock) return _target; } }
    /// <summary>Connections accepted, connections closed for bad input, requests answered, requests that timed out.</summary>
    public long Accepted => Interlocked.Read(ref _accepted);
    public long Rejected => Interlocked.Read(ref _rejected);
    public long Served => Interlocked.Read(ref _served);
    public long TimedOut => Interlocked.Read(ref _timedOut);

    /// <summary>Routes requests to <paramref name="workload"/> from now on (null: hold them), moving the unserved ones along.</summary>
    public void Attach(KvWorkload? workload)
    {
        lock (_routeLock)
        {
            if (ReferenceEquals(workload, _target)) return;
            _target?.DrainTo(_orphans);
            _target = workload;
            if (workload is null) return;
            foreach (var r in _orphans) workload.Enqueue(r);
            _orphans.Clear();
        }
    }

    public void Detach() => Attach(null);

    private void Route(KvRequest request)
    {
        request.MarkQueued();
        lock (_routeLock)
        {
            if (_target is { } t) t.Enqueue(request);
            else _orphans.Add(request);
        }
    }

    private void AcceptLoop()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket s;
            try { s = _listener.Accept(); }
            catch (SocketException) { return; }
            catch (ObjectDisposedException) { return; }
            lock (_connLock)
            {
                if (_stop.IsCancellationRequested || _connections.Count >= MaxConnections) { s.Dispose(); continue; }
                _connections.Add(s);
                s.NoDelay = true; // one small message each way per request: Nagle would add tens of ms
                Interlocked.Increment(ref _accepted);
                var t = new Thread(() => Serve(s)) { IsBackground = true, Name = "kv-endpoint-conn" };
                _threads.RemoveAll(x => !x.IsAlive);
                _threads.Add(t);
                t.Start();
            }
        }
    }

    private void Serve(Socket s)
    {
        var header = new byte[KvProtocol.RequestHeaderSize];
        var reply = new byte[KvProtocol.ResponseHeaderSize + KvProtocol.MaxValueLength];
        var request = new KvRequest();
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                if (!ReadExactly(s, header, atMessageStart: true)) return; // clean close by the client
                var op = (KvOp)header[0];
                ulong key = BinaryPrimitives.ReadUInt64LittleEndian(header.AsSpan(1));
                int length = BinaryPrimitives.ReadUInt16LittleEndian(header.AsSpan(9));
                bool valid = op switch
                {
                    KvOp.Get => length == 0,
                    KvOp.Put => length <= KvProtocol.MaxValueLength,
                    _ => false,
                };
                if (!valid) { Interlocked.Increment(ref _rejected); return; }
                ReadExactly(s, new ArraySegment<byte>(request.Buffer, 0, length), atMessageStart: false);
                request.Prepare(op, key, length);
                Route(request);
                if (!request.Wait(RequestTimeout, _stop.Token))
                {
                    Interlocked.Increment(ref _timedOut);
                    // The abandoned request may still sit in a queue: never reuse it.
                    var failed = request;
                    request = new KvRequest();
                    KvProtocol.WriteResponseHeader(reply, failed.Status, 0);
                    SendAll(s, reply.AsSpan(0, KvProtocol.ResponseHeaderSize));
                    continue;
                }
                int n = request.ValueLength;
                KvProtocol.WriteResponseHeader(reply, request.Status, n);
                request.Value.CopyTo(reply.AsSpan(KvProtocol.ResponseHeaderSize));
                SendAll(s, reply.AsSpan(0, KvProtocol.ResponseHeaderSize + n));
                Interlocked.Increment(ref _served);
            }
        }
        catch (SocketException) { }
        catch (ObjectDisposedException) { }
        finally
        {
            lock (_connLock) _connections.Remove(s);
            s.Dispose();
        }
    }

    /// <summary>Fills <paramref name="buffer"/>; false on a clean close before the first byte of a message. A close mid-message throws.</summary>
    private static bool ReadExactly(Socket s, ArraySegment<byte> buffer, bool atMessageStart)
    {
        int got = 0;
        while (got < buffer.Count)
        {
            int n = s.Receive(buffer.AsSpan(got));
            if (n == 0)
            {
                if (got == 0 && atMessageStart) return false;
                throw new SocketException((int)SocketError.ConnectionReset);
            }
            got += n;
        }
        return true;
    }

    private static void SendAll(Socket s, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty) data = data[s.Send(data)..];
    }

    public void Dispose()
    {
        if (_stop.IsCancellationRequested) return;
        _stop.Cancel();
        _listener.Dispose();
        Thread[] threads;
        lock (_connLock)
        {
            foreach (var s in _connections)
            {
                try { s.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
            }
            threads = [.. _threads];
        }
        _acceptThread.Join();
        foreach (var t in threads) t.Join();
        lock (_routeLock)
        {
            _target = null;
            foreach (var r in _orphans) r.Fail();
            _orphans.Clear();
        }
        _stop.Dispose();
    }
}
