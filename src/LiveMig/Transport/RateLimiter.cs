using LiveMig.Core;

namespace LiveMig.Transport;

/// <summary>
/// Token bucket shared by every sender of a migration. The rate can change while a migration
/// runs. A sender that takes more than the bucket holds goes into debt and sleeps it off, so
/// large frames need no special case; the burst is 10 ms worth of the rate (at least 256 KiB).
/// Time goes through the <see cref="TimeProvider"/> given: on a <see cref="VirtualClock"/> the
/// sleep that pays a debt advances virtual time, so the limiter is also a model of a link.
/// </summary>
public sealed class RateLimiter
{
    private readonly object _lock = new();
    private readonly TimeProvider _time;
    private long _bytesPerSecond;
    private double _tokens;
    private long _last;

    public RateLimiter(long bytesPerSecond, TimeProvider? time = null)
    {
        _time = time ?? TimeProvider.System;
        _last = _time.GetTimestamp();
        BytesPerSecond = bytesPerSecond;
    }

    /// <summary>Bytes per second; 0 means unlimited.</summary>
    public long BytesPerSecond
    {
        get => Volatile.Read(ref _bytesPerSecond);
        set
        {
            ArgumentOutOfRangeException.ThrowIfNegative(value);
            lock (_lock) { _bytesPerSecond = value; _tokens = Math.Min(_tokens, Burst(value)); }
        }
    }

    private static double Burst(long rate) => Math.Max(256 << 10, rate / 100.0);

    /// <summary>
    /// Takes <paramref name="bytes"/> from the bucket without waiting (a sender with priority, e.g.
    /// post-copy's requested pages); the debt is paid by the next <see cref="Consume"/>. Negative
    /// gives back what an estimate over-charged.
    /// </summary>
    public void Charge(long bytes)
    {
        lock (_lock)
        {
            long rate = _bytesPerSecond;
            if (rate <= 0) return;
            long now = _time.GetTimestamp();
            _tokens = Math.Min(Burst(rate), _tokens + (now - _last) * (double)rate / _time.TimestampFrequency - bytes);
            _last = now;
        }
    }

    public void Consume(int bytes)
    {
        double waitSeconds;
        lock (_lock)
        {
            long rate = _bytesPerSecond;
            if (rate <= 0) return;
            long now = _time.GetTimestamp();
            _tokens = Math.Min(Burst(rate), _tokens + (now - _last) * (double)rate / _time.TimestampFrequency);
            _last = now;
            _tokens -= bytes;
            if (_tokens >= 0) return;
            waitSeconds = -_tokens / rate;
        }
        _time.Sleep(TimeSpan.FromSeconds(waitSeconds));
    }
}
