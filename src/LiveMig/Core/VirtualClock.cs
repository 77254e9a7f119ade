namespace LiveMig.Core;

/// <summary>
/// A clock that moves only when told to: the simulator's time, and the tests'. Waiting on it
/// (<see cref="ClockExtensions.Sleep"/>) advances it, so one thread can drive a whole migration
/// through modelled links in virtual time; timers made with <see cref="CreateTimer"/> fire as it
/// passes their due time. Timestamps are nanoseconds since the clock was made.
/// </summary>
public sealed class VirtualClock : TimeProvider
{
    private readonly Lock _lock = new();
    private readonly DateTimeOffset _epoch;
    private readonly List<VirtualTimer> _timers = [];
    private long _now; // nanoseconds

    public VirtualClock(DateTimeOffset? epoch = null) => _epoch = epoch ?? new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);

    public override long TimestampFrequency => 1_000_000_000;

    public override long GetTimestamp() => Volatile.Read(ref _now);

    public override DateTimeOffset GetUtcNow() => _epoch + Elapsed;

    /// <summary>Timers armed now (a test waits for the code under test to arm its deadline before moving time past it).</summary>
    public int ArmedTimers { get { lock (_lock) return _timers.Count; } }

    /// <summary>Virtual time since the clock was made.</summary>
    public TimeSpan Elapsed => TimeSpan.FromTicks(Volatile.Read(ref _now) / 100);

    /// <summary>Moves time forward by <paramref name="by"/> (negative or zero: no move), firing the timers that fall due, in due order.</summary>
    public void Advance(TimeSpan by)
    {
        if (by <= TimeSpan.Zero) return;
        AdvanceTo(checked(Volatile.Read(ref _now) + by.Ticks * 100));
    }

    /// <summary>
    /// Moves time forward to <paramref name="timestamp"/> (nanoseconds; one in the past: no move),
    /// firing the timers that fall due. The simulator's event loop jumps from event to event with
    /// it, at nanosecond resolution (a <see cref="TimeSpan"/> has 100 ns ticks).
    /// </summary>
    public void AdvanceTo(long timestamp)
    {
        long target = timestamp;
        if (target <= Volatile.Read(ref _now)) return;
        while (true)
        {
            VirtualTimer? next;
            lock (_lock)
            {
                next = null;
                foreach (var t in _timers)
                    if (t.Due <= target && (next is null || t.Due < next.Due)) next = t;
                if (next is null) { _now = target; return; }
                _now = Math.Max(_now, next.Due);
                next.Rearm();
            }
            next.Fire();
        }
    }

    public override ITimer CreateTimer(TimerCallback callback, object? state, TimeSpan dueTime, TimeSpan period)
    {
        var t = new VirtualTimer(this, callback, state);
        t.Change(dueTime, period);
        return t;
    }

    private sealed class VirtualTimer(VirtualClock clock, TimerCallback callback, object? state) : ITimer
    {
        private long _period;
        public long Due { get; private set; } = long.MaxValue;

        /// <summary>Under the clock's lock: the next due time, or off for a one-shot timer.</summary>
        public void Rearm()
        {
            if (_period > 0) Due += _period;
            else { Due = long.MaxValue; clock._timers.Remove(this); }
        }

        public void Fire() => callback(state);

        public bool Change(TimeSpan dueTime, TimeSpan period)
        {
            lock (clock._lock)
            {
                clock._timers.Remove(this);
                if (dueTime == Timeout.InfiniteTimeSpan) { Due = long.MaxValue; return true; }
                Due = clock._now + Math.Max(0, dueTime.Ticks) * 100;
                _period = period == Timeout.InfiniteTimeSpan || period <= TimeSpan.Zero ? 0 : period.Ticks * 100;
                clock._timers.Add(this);
            }
            return true;
        }

        public void Dispose()
        {
            lock (clock._lock) clock._timers.Remove(this);
        }

        public ValueTask DisposeAsync()
        {
            Dispose();
            return ValueTask.CompletedTask;
        }
    }
}
