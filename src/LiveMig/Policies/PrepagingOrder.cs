using LiveMig.Memory;

namespace LiveMig.Policies;

public sealed record PrepagingOptions
{
    /// <summary>Pages pushed on each side of a faulting page before the background scan resumes (starting value).</summary>
    public int Window { get; init; } = 32;
    public int MinWindow { get; init; } = 8;
    public int MaxWindow { get; init; } = 1024;
    /// <summary>Grow the window while faults fall near the previous one (spatial locality), shrink it when they do not.</summary>
    public bool Adaptive { get; init; } = true;
    /// <summary>Off: plain address-order push, faults only served on demand.</summary>
    public bool Enabled { get; init; } = true;
}

/// <summary>
/// The order of the background push (adaptive prepaging after Hines and Gopalan): pages go out
/// in address order, but a fault makes its neighbourhood next — the pages after and before it,
/// alternately, outwards ("bubbling") to a window — because a guest that touched one page is
/// likely to touch the next ones soon. The window doubles while consecutive faults land inside
/// the previous fault's window and halves when they do not. Pages already sent are skipped (the
/// pending bitmap is the truth). Thread-safe: the request server calls <see cref="OnFault"/>, the
/// pusher <see cref="Next"/>. No I/O, no clock.
/// </summary>
public sealed class PrepagingOrder(long pageCount, PrepagingOptions? options = null)
{
    private readonly PrepagingOptions _o = options ?? new PrepagingOptions();
    private readonly Lock _lock = new();
    private long _cursor;
    private long _pivot = -1, _newFault = -1, _lastFault = -1;
    private int _k;
    private int _window = Math.Max(1, (options ?? new PrepagingOptions()).Window);

    public int Window { get { lock (_lock) return _window; } }
    /// <summary>Pages returned because they neighbour a fault.</summary>
    public long Prepaged { get; private set; }

    public void OnFault(long page)
    {
        if (!_o.Enabled) return;
        lock (_lock)
        {
            if (_o.Adaptive && _lastFault >= 0)
            {
                bool near = Math.Abs(page - _lastFault) <= _window;
                _window = near ? Math.Min(_o.MaxWindow, _window * 2) : Math.Max(_o.MinWindow, _window / 2);
            }
            _lastFault = page;
            _newFault = page;
        }
    }

    /// <summary>Restarts the address-order scan (after a reconnection, when pages became pending again).</summary>
    public void Rewind() { lock (_lock) _cursor = 0; }

    /// <summary>The next pending page to push, or -1 when none is pending. Does not claim it.</summary>
    public long Next(NativePageBitmap pending)
    {
        lock (_lock)
        {
            if (_newFault >= 0) { _pivot = _newFault; _newFault = -1; _k = 0; }
            while (_pivot >= 0 && _k < 2 * _window)
            {
                long d = _k / 2 + 1;
                long candidate = (_k & 1) == 0 ? _pivot + d : _pivot - d;
                _k++;
                if (candidate >= 0 && candidate < pageCount && pending.IsSet(candidate)) { Prepaged++; return candidate; }
            }
            _pivot = -1;
            long p = pending.NextSet(_cursor);
            if (p < 0 && _cursor > 0) p = pending.NextSet(0);
            if (p >= 0) _cursor = p + 1;
            return p;
        }
    }
}
