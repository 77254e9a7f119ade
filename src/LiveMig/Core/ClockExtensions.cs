namespace LiveMig.Core;

/// <summary>
/// Waiting through a <see cref="TimeProvider"/>: the one way engine code sleeps, so the same
/// code runs on the wall clock and on a <see cref="VirtualClock"/> (where a wait advances time
/// instead of blocking).
/// </summary>
public static class ClockExtensions
{
    /// <summary>Waits <paramref name="delay"/>; cancellation ends the wait early and throws.</summary>
    public static void Sleep(this TimeProvider time, TimeSpan delay, CancellationToken cancel = default)
    {
        if (delay <= TimeSpan.Zero) return;
        if (time is VirtualClock v) v.Advance(delay);
        else if (cancel.CanBeCanceled) cancel.WaitHandle.WaitOne(delay);
        else Thread.Sleep(delay);
        cancel.ThrowIfCancellationRequested();
    }

    /// <summary>
    /// Waits up to <paramref name="delay"/> for any of <paramref name="handles"/>; returns the
    /// index of the one signalled, or <see cref="WaitHandle.WaitTimeout"/>. On a virtual clock
    /// the whole delay passes first and the handles are then looked at once.
    /// </summary>
    public static int WaitAny(this TimeProvider time, WaitHandle[] handles, TimeSpan delay)
    {
        if (time is not VirtualClock v) return WaitHandle.WaitAny(handles, delay);
        v.Advance(delay);
        return WaitHandle.WaitAny(handles, 0);
    }

    /// <summary>Time since <paramref name="timestamp"/> (one of this provider's), as the provider measures it.</summary>
    public static double MillisecondsSince(this TimeProvider time, long timestamp) => time.GetElapsedTime(timestamp).TotalMilliseconds;
}
