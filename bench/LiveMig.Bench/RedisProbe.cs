using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace LiveMig.Bench;

/// <summary>What a <see cref="RedisProbe"/> saw through a migration.</summary>
/// <param name="Requests">Replies received (each SET and each GET is one).</param>
/// <param name="Errors">Requests that got no good reply: timeouts, resets, error replies (failed attempts to reconnect are not counted: they are the gap).</param>
/// <param name="WrongAnswers">GETs answered with another value than the one just written.</param>
/// <param name="LongestGapMs">The longest time between two successive replies: the service interruption the client saw.</param>
/// <param name="GapStartS">When that gap began, seconds after the probe started.</param>
/// <param name="Reconnects">Connections made after the first.</param>
/// <param name="KeysWritten">Keys whose SET was acknowledged.</param>
/// <param name="KeysInDoubt">Keys whose SET was sent but not acknowledged (the connection broke): they may or may not be there, and are not checked.</param>
/// <param name="PortsUsed">The ports that answered, in the order the probe used them.</param>
internal sealed record RedisProbeResult(long Requests, long Errors, long WrongAnswers, double LongestGapMs, double GapStartS, int Reconnects,
    int KeysWritten, int KeysInDoubt, IReadOnlyList<int> PortsUsed);

/// <summary>The check after the move: every acknowledged key read back.</summary>
internal sealed record RedisKeyCheck(int Checked, int Missing, int Wrong)
{
    public bool AllThere => Missing == 0 && Wrong == 0;
    public override string ToString() => $"{Checked:N0} keys read back, {Missing} missing, {Wrong} wrong";
}

/// <summary>
/// A redis client of ours through a migration of the Linux guest (guests/linux): one connection,
/// a SET of a fresh key and a GET of it, over and over at a fixed pace, every reply timestamped,
/// so the longest gap between two replies is the interruption the client saw (as the built-in
/// VM's kv client reports). When the connection breaks or a reply is late it reconnects to
/// whichever of <c>ports()</c> answers a PING first — the source QEMU's forwarded port until it
/// stops answering, then the destination's (each side chooses its own host port, so both can
/// be given). After the move, <see cref="CheckKeys"/> reads every acknowledged key back.
/// RESP is written by hand: a few commands, no dependency.
/// </summary>
internal sealed class RedisProbe : IDisposable
{
    private readonly Func<IReadOnlyList<int>> _ports;
    private readonly TimeSpan _requestTimeout;
    private readonly TimeSpan _interval;
    private readonly string _prefix;
    private readonly List<(string Key, string Value)> _written = [];
    private readonly List<int> _portsUsed = [];
    private readonly Stopwatch _clock = new();
    private readonly CancellationTokenSource _stop = new();
    private Thread? _thread;
    private Connection? _connection;
    private long _requests, _errors, _wrong;
    private int _reconnects, _inDoubt;
    private double _lastReplyMs = -1, _longestGapMs, _gapStartMs;

    /// <param name="ports">The host ports to try, asked anew at each reconnection (a destination's port may appear later).</param>
    /// <param name="requestTimeout">A reply later than this counts as an error and the probe reconnects.</param>
    /// <param name="pairsPerSecond">SET+GET pairs per second (the timestamps' resolution is the interval between them).</param>
    public RedisProbe(Func<IReadOnlyList<int>> ports, TimeSpan? requestTimeout = null, int pairsPerSecond = 500, string prefix = "livemig")
    {
        if (pairsPerSecond < 1) throw new ArgumentOutOfRangeException(nameof(pairsPerSecond), "at least one pair per second");
        _ports = ports;
        _requestTimeout = requestTimeout ?? TimeSpan.FromSeconds(1);
        _interval = TimeSpan.FromSeconds(1.0 / pairsPerSecond);
        _prefix = prefix;
    }

    /// <summary>Replies so far (read while it runs).</summary>
    public long Requests => Interlocked.Read(ref _requests);

    /// <summary>Connects (bounded by <paramref name="within"/>) and starts the request loop on a thread of its own.</summary>
    public void Start(TimeSpan within)
    {
        _clock.Start();
        var sw = Stopwatch.StartNew();
        while ((_connection = TryConnect()) is null)
        {
            if (sw.Elapsed > within) throw new TimeoutException($"redis did not answer PING on port(s) {string.Join(", ", _ports())} within {within.TotalSeconds:0} s");
            Thread.Sleep(100);
        }
        _thread = new Thread(Loop) { IsBackground = true, Name = "redis-probe" };
        _thread.Start();
    }

    /// <summary>Stops the loop and says what it saw.</summary>
    public RedisProbeResult Stop()
    {
        _stop.Cancel();
        if (_thread is not null && !_thread.Join(TimeSpan.FromSeconds(10))) throw new TimeoutException("the redis probe's thread did not stop within 10 s");
        lock (_written)
            return new RedisProbeResult(_requests, _errors, _wrong, _longestGapMs, _gapStartMs / 1000, _reconnects, _written.Count, _inDoubt, [.. _portsUsed]);
    }

    /// <summary>After <see cref="Stop"/>: reads every acknowledged key back (MGET in batches) from the port that answers now.</summary>
    public RedisKeyCheck CheckKeys(TimeSpan within)
    {
        var sw = Stopwatch.StartNew();
        Connection? c;
        while ((c = _connection is { } live && live.Ping() ? live : TryConnect()) is null)
        {
            if (sw.Elapsed > within) throw new TimeoutException($"redis did not answer on port(s) {string.Join(", ", _ports())} within {within.TotalSeconds:0} s to check the keys");
            Thread.Sleep(100);
        }
        _connection = c;
        int missing = 0, wrong = 0;
        List<(string Key, string Value)> keys;
        lock (_written) keys = [.. _written];
        foreach (var batch in keys.Chunk(500))
        {
            var values = c.MGet([.. batch.Select(k => k.Key)]);
            for (int i = 0; i < batch.Length; i++)
            {
                if (values[i] is null) missing++;
                else if (values[i] != batch[i].Value) wrong++;
            }
        }
        return new RedisKeyCheck(keys.Count, missing, wrong);
    }

    private void Loop()
    {
        long n = 0;
        double next = _clock.Elapsed.TotalMilliseconds;
        while (!_stop.IsCancellationRequested)
        {
            double now = _clock.Elapsed.TotalMilliseconds;
            if (now < next) { Thread.Sleep(TimeSpan.FromMilliseconds(Math.Min(next - now, 50))); continue; }
            next = Math.Max(next + _interval.TotalMilliseconds, now - 10 * _interval.TotalMilliseconds);
            if (_connection is null && (_connection = TryConnect()) is null) continue; // nobody answers yet: the gap goes on
            string key = $"{_prefix}:{n}", value = $"v{n}-{Environment.TickCount64}";
            try
            {
                n++;
                _connection.Set(key, value);
                Replied();
                lock (_written) _written.Add((key, value));
                if (_connection.Get(key) != value) Interlocked.Increment(ref _wrong);
                Replied();
            }
            catch (Exception e) when (e is SocketException or IOException or InvalidDataException or ObjectDisposedException)
            {
                // The SET may have landed or not: that key is not checked afterwards.
                lock (_written) if (_written.Count == 0 || _written[^1].Key != key) _inDoubt++;
                Interlocked.Increment(ref _errors);
                _connection.Dispose();
                _connection = null;
            }
        }
        _connection?.Dispose();
        _connection = null;
    }

    private void Replied()
    {
        double now = _clock.Elapsed.TotalMilliseconds;
        Interlocked.Increment(ref _requests);
        if (_lastReplyMs >= 0 && now - _lastReplyMs > _longestGapMs) { _longestGapMs = now - _lastReplyMs; _gapStartMs = _lastReplyMs; }
        _lastReplyMs = now;
    }

    /// <summary>The first port of <c>ports()</c> whose redis answers PING, or null; each try bounded by a short timeout.</summary>
    private Connection? TryConnect()
    {
        foreach (int port in _ports())
        {
            var c = Connection.TryOpen(port, TimeSpan.FromMilliseconds(200), _requestTimeout);
            if (c is null) continue;
            if (_portsUsed.Count > 0) _reconnects++;
            if (_portsUsed.Count == 0 || _portsUsed[^1] != port) _portsUsed.Add(port);
            return c;
        }
        return null;
    }

    public void Dispose()
    {
        _stop.Cancel();
        _thread?.Join(TimeSpan.FromSeconds(10));
        _connection?.Dispose();
        _stop.Dispose();
    }

    /// <summary>One TCP connection speaking RESP: requests as arrays of bulk strings, replies parsed as far as these commands need.</summary>
    private sealed class Connection(Socket socket) : IDisposable
    {
        private readonly byte[] _buffer = new byte[64 << 10];
        private int _start, _end;

        public static Connection? TryOpen(int port, TimeSpan connectTimeout, TimeSpan replyTimeout)
        {
            var s = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true, ReceiveTimeout = (int)replyTimeout.TotalMilliseconds, SendTimeout = (int)replyTimeout.TotalMilliseconds };
            try
            {
                using var cancel = new CancellationTokenSource(connectTimeout);
                s.ConnectAsync(IPAddress.Loopback, port, cancel.Token).AsTask().GetAwaiter().GetResult();
                var c = new Connection(s);
                if (c.Ping()) return c;
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException or IOException or InvalidDataException) { }
            s.Dispose();
            return null;
        }

        public bool Ping()
        {
            try { return Command("PING") is "PONG"; }
            catch (Exception e) when (e is SocketException or IOException or InvalidDataException or ObjectDisposedException) { return false; }
        }

        public void Set(string key, string value)
        {
            if (Command("SET", key, value) is not "OK") throw new InvalidDataException("SET was not answered +OK");
        }

        public string? Get(string key) => Command("GET", key);

        public string?[] MGet(string[] keys)
        {
            Send(["MGET", .. keys]);
            string header = Line();
            if (header[0] != '*' || !int.TryParse(header.AsSpan(1), out int count) || count != keys.Length) throw new InvalidDataException($"MGET answered '{header}'");
            var values = new string?[count];
            for (int i = 0; i < count; i++) values[i] = Reply(Line());
            return values;
        }

        private string? Command(params string[] args)
        {
            Send(args);
            return Reply(Line());
        }

        private void Send(string[] args)
        {
            var b = new StringBuilder().Append('*').Append(args.Length).Append("\r\n");
            foreach (string a in args) b.Append('$').Append(Encoding.UTF8.GetByteCount(a)).Append("\r\n").Append(a).Append("\r\n");
            byte[] bytes = Encoding.UTF8.GetBytes(b.ToString());
            for (int sent = 0; sent < bytes.Length;) sent += socket.Send(bytes, sent, bytes.Length - sent, SocketFlags.None);
        }

        /// <summary>A simple string, or a bulk string's value (null for a missing key); an error reply throws.</summary>
        private string? Reply(string line)
        {
            switch (line[0])
            {
                case '+': return line[1..];
                case '-': throw new InvalidDataException($"redis answered an error: {line[1..]}");
                case '$':
                    if (!int.TryParse(line.AsSpan(1), out int length)) throw new InvalidDataException($"bad bulk length '{line}'");
                    if (length < 0) return null;
                    string value = Line();
                    if (Encoding.UTF8.GetByteCount(value) != length) throw new InvalidDataException("bulk string of the wrong length");
                    return value;
                default: throw new InvalidDataException($"unexpected reply '{line}'");
            }
        }

        /// <summary>The next CRLF-terminated line (the socket's receive timeout bounds every wait).</summary>
        private string Line()
        {
            while (true)
            {
                int lf = Array.IndexOf(_buffer, (byte)'\n', _start, _end - _start);
                if (lf > _start && _buffer[lf - 1] == '\r')
                {
                    string line = Encoding.UTF8.GetString(_buffer, _start, lf - 1 - _start);
                    _start = lf + 1;
                    if (line.Length == 0) throw new InvalidDataException("empty reply line");
                    return line;
                }
                if (_start > 0) { Array.Copy(_buffer, _start, _buffer, 0, _end - _start); _end -= _start; _start = 0; }
                if (_end == _buffer.Length) throw new InvalidDataException("reply line longer than 64 KiB");
                int n = socket.Receive(_buffer, _end, _buffer.Length - _end, SocketFlags.None);
                if (n == 0) throw new IOException("redis closed the connection");
                _end += n;
            }
        }

        public void Dispose() => socket.Dispose();
    }
}
