using LiveMig.Core;

namespace LiveMig.Transport;

/// <summary>
/// Bounded exponential back-off between reconnection attempts: waits <c>first</c>, then twice
/// that, up to <c>max</c> per wait, and gives up once the next wait would end after
/// <c>window</c> from the start. Shared by pre-copy resume and post-copy recovery.
/// </summary>
public sealed class RetryBackoff(TimeSpan first, TimeSpan max, TimeSpan window, TimeProvider? time = null)
{
    private readonly TimeProvider _time = time ?? TimeProvider.System;
    private readonly long _start = (time ?? TimeProvider.System).GetTimestamp();
    private TimeSpan _delay = first;

    public TimeSpan Window => window;

    /// <summary>
    /// Waits before the next attempt; false (without waiting) when that attempt would fall outside
    /// the window. <paramref name="wake"/>, when signalled, ends the wait early. Cancellation throws.
    /// </summary>
    public bool Wait(CancellationToken cancel = default, WaitHandle? wake = null)
    {
        if (_time.GetElapsedTime(_start) + _delay > window) return false;
        _time.WaitAny(wake is null ? [cancel.WaitHandle] : [cancel.WaitHandle, wake], _delay);
        cancel.ThrowIfCancellationRequested();
        _delay = TimeSpan.FromTicks(Math.Min(_delay.Ticks * 2, max.Ticks));
        return true;
    }
}
