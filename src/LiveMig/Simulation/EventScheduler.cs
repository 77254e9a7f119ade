using LiveMig.Core;

namespace LiveMig.Simulation;

/// <summary>
/// The simulator's discrete-event core: actions queued at instants of one <see cref="VirtualClock"/>,
/// run in time order (ties in the order they were queued, so a run is deterministic), the clock
/// jumped to each one's instant before it runs. Everything the simulation models — flows on the
/// network, migrations' rounds, the round controllers and policies they drive — reads time from
/// <see cref="Clock"/> only. Single-threaded: one simulation is one thread.
/// </summary>
public sealed class EventScheduler
{
    private readonly PriorityQueue<Action, (long At, long Seq)> _queue = new();
    private readonly HashSet<long> _cancelled = [];
    private long _seq;

    public EventScheduler(VirtualClock? clock = null) => Clock = clock ?? new VirtualClock();

    public VirtualClock Clock { get; }

    /// <summary>Now, in nanoseconds of virtual time.</summary>
    public long Now => Clock.GetTimestamp();

    /// <summary>Now, in seconds of virtual time.</summary>
    public double NowSeconds => Now / 1e9;

    /// <summary>Events run so far.</summary>
    public long EventsRun { get; private set; }

    /// <summary>Events waiting (cancelled ones not counted).</summary>
    public int Pending => _queue.Count - _cancelled.Count;

    /// <summary>Runs <paramref name="action"/> at <paramref name="timestamp"/> (nanoseconds; the past means now, after what is already queued for now). Returns the event's id, for <see cref="Cancel"/>.</summary>
    public long At(long timestamp, Action action)
    {
        long id = _seq++;
        _queue.Enqueue(action, (Math.Max(timestamp, Now), id));
        return id;
    }

    public long After(TimeSpan delay, Action action) => At(Now + Nanoseconds(delay), action);

    public long AfterSeconds(double seconds, Action action) => At(Now + Nanoseconds(seconds), action);

    /// <summary>
    /// The event will not run, and time will not move to it: a completion that a later change
    /// superseded must not stretch the simulation past its last real event.
    /// </summary>
    public void Cancel(long id) => _cancelled.Add(id);

    public static long Nanoseconds(TimeSpan t) => t <= TimeSpan.Zero ? 0 : checked(t.Ticks * 100);

    /// <summary>Seconds as whole nanoseconds, rounded up (an event never fires before its time); negative: 0.</summary>
    public static long Nanoseconds(double seconds) => seconds <= 0 ? 0 : seconds >= long.MaxValue / 1e9 ? long.MaxValue / 2 : (long)Math.Ceiling(seconds * 1e9);

    /// <summary>
    /// Runs events until none is left, or the next is later than <paramref name="until"/>, or
    /// <paramref name="maxEvents"/> have run (a bound: a model that never stops cannot hang the caller).
    /// Returns the number run by this call.
    /// </summary>
    public long Run(long until = long.MaxValue, long maxEvents = long.MaxValue)
    {
        long ran = 0;
        while (ran < maxEvents && _queue.TryPeek(out _, out var key) && key.At <= until)
        {
            var action = _queue.Dequeue();
            if (_cancelled.Remove(key.Seq)) continue;
            Clock.AdvanceTo(key.At);
            action();
            ran++;
        }
        EventsRun += ran;
        return ran;
    }
}
