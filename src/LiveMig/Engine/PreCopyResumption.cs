using System.Collections.Concurrent;
using LiveMig.Protocol;

namespace LiveMig.Engine;

/// <summary>
/// Destination half of pre-copy resume (capability PreCopyResume, docs/protocol.md "Resume").
/// An incoming pre-copy migration that negotiated it is registered by id in its destination's
/// <see cref="DestinationSessions"/>. When its
/// connection fails before Prepare, its receiving thread waits (up to the resume window) for the
/// source to come back: a new connection whose first frame is Attach hands itself over, and the
/// receiving thread carries on with the same partial VM on the new connection. The attaching
/// connection's thread only lends its stream: it blocks until the migration is done with it, so
/// each connection is still closed by the thread that accepted it.
/// </summary>
internal sealed class PreCopyResumption
{
    private readonly ConcurrentDictionary<Guid, PreCopyResumption> _sessions;
    private readonly Guid _id;
    private readonly object _lock = new(); // Monitor.Wait/PulseAll, so not a System.Threading.Lock
    private Lent? _offered;
    private Lent? _current;
    private Stream? _currentStream;
    private bool _closed;

    private PreCopyResumption(ConcurrentDictionary<Guid, PreCopyResumption> sessions, Guid id)
    {
        _sessions = sessions;
        _id = id;
    }

    /// <summary>A connection lent to the migration, with its frame reader and writer.</summary>
    internal sealed class Lent(Stream stream, FrameReader reader, FrameWriter frames)
    {
        public Stream Stream { get; } = stream;
        public FrameReader Reader { get; } = reader;
        public FrameWriter Frames { get; } = frames;
        public ManualResetEventSlim Returned { get; } = new();
    }

    public static PreCopyResumption Register(DestinationSessions sessions, Guid id, Stream current)
    {
        var s = new PreCopyResumption(sessions.Resumable, id) { _currentStream = current };
        if (!sessions.Resumable.TryAdd(id, s)) throw new ProtocolException($"migration {id} is already in progress here");
        return s;
    }

    public static bool IsKnown(DestinationSessions sessions, Guid id) => sessions.Resumable.ContainsKey(id);

    /// <summary>
    /// Runs on the thread of a connection whose first frame was Attach for a registered pre-copy
    /// migration: offers the connection, breaks the old one (the source only reattaches after it
    /// saw it fail; a half-open connection must fail here too), and waits until the migration is
    /// done with this connection.
    /// </summary>
    public static void ServeAttach(DestinationSessions sessions, Guid id, Stream stream, FrameReader reader, FrameWriter frames)
    {
        if (!sessions.Resumable.TryGetValue(id, out var session))
            throw new ProtocolException($"Attach: no pre-copy migration {id} is waiting here (it completed, failed, or its resume window ran out)");
        var lent = new Lent(stream, reader, frames);
        Stream? stale;
        Lent? replaced;
        lock (session._lock)
        {
            if (session._closed) throw new ProtocolException($"Attach: pre-copy migration {id} has ended");
            replaced = session._offered;
            session._offered = lent;
            stale = session._currentStream;
            Monitor.PulseAll(session._lock);
        }
        replaced?.Returned.Set();
        try { stale?.Dispose(); } catch (Exception e) when (e is IOException or ObjectDisposedException) { }
        lent.Returned.Wait();
    }

    /// <summary>
    /// Receiving thread, after its connection failed: waits up to <paramref name="window"/> for the
    /// source to attach again. Returns the new connection, or null when none came in time (the
    /// caller discards the partial VM then). The connection it replaces is given back.
    /// </summary>
    public Lent? AwaitReattach(TimeSpan window)
    {
        Lent? previous, next;
        lock (_lock)
        {
            previous = _current;
            _current = null;
            _currentStream = null;
            long deadline = Environment.TickCount64 + (long)window.TotalMilliseconds;
            while (_offered is null && !_closed)
            {
                long left = deadline - Environment.TickCount64;
                if (left <= 0) break;
                Monitor.Wait(_lock, TimeSpan.FromMilliseconds(left));
            }
            next = _offered;
            _offered = null;
            if (next is not null)
            {
                _current = next;
                _currentStream = next.Stream;
            }
            else
            {
                _closed = true;
            }
        }
        previous?.Returned.Set();
        if (next is null) _sessions.TryRemove(new KeyValuePair<Guid, PreCopyResumption>(_id, this));
        return next;
    }

    /// <summary>The migration ended (arrived or failed): no more reattaching; every lent connection is given back.</summary>
    public void Close()
    {
        Lent? current, offered;
        lock (_lock)
        {
            _closed = true;
            current = _current;
            offered = _offered;
            _current = _offered = null;
            _currentStream = null;
        }
        _sessions.TryRemove(new KeyValuePair<Guid, PreCopyResumption>(_id, this));
        current?.Returned.Set();
        offered?.Returned.Set();
    }
}
