namespace LiveMig.Engine;

/// <summary>
/// Where a running migration reconnects to after a drop, changeable while it runs, and a way to
/// cut its back-off short (<c>livemig migrate --resume ID [--to HOST:PORT]</c>: the destination
/// agent moved, or the operator knows the link is back).
/// </summary>
public sealed class ReconnectTarget(string host, int port)
{
    private readonly Lock _lock = new();
    private string _host = host;
    private int _port = port;

    public (string Host, int Port) Current { get { lock (_lock) return (_host, _port); } }

    /// <summary>Set while the migration waits between reconnection attempts.</summary>
    public bool Reconnecting { get; internal set; }

    internal AutoResetEvent Wake { get; } = new(false);

    /// <summary>Waits out the back-off before the next attempt (marked as reconnecting, cut short by <see cref="RetryNow"/>); false when the window is over.</summary>
    internal static bool WaitToRetry(Transport.RetryBackoff backoff, ReconnectTarget? target, CancellationToken cancel)
    {
        if (target is null) return backoff.Wait(cancel);
        target.Reconnecting = true;
        try { return backoff.Wait(cancel, target.Wake); }
        finally { target.Reconnecting = false; }
    }

    private (string Host, int Port)? _restart;
    private volatile bool _abandoned;

    /// <summary>
    /// Post-copy after the switch, the destination lost: start the migration over from the
    /// source's paused VM (its state at the switch) to <paramref name="host"/>:<paramref name="port"/>.
    /// What the VM did on the lost destination since the switch is lost.
    /// </summary>
    public void Restart(string host, int port)
    {
        lock (_lock) _restart = (host, port);
        Wake.Set();
    }

    /// <summary>Post-copy after the switch: give up recovery and discard the source's copy (an operator's explicit decision).</summary>
    public void Abandon()
    {
        _abandoned = true;
        Wake.Set();
    }

    internal bool Abandoned => _abandoned;

    internal (string Host, int Port)? RestartRequested { get { lock (_lock) return _restart; } }

    /// <summary>The restart asked for, taken (so a failed one is not retried unless asked again).</summary>
    internal (string Host, int Port)? TakeRestart()
    {
        lock (_lock)
        {
            var r = _restart;
            _restart = null;
            return r;
        }
    }

    /// <summary>Next attempt now (ending the current back-off wait), at a new address if given.</summary>
    public void RetryNow(string? host = null, int? port = null)
    {
        lock (_lock)
        {
            if (host is not null) _host = host;
            if (port is not null) _port = port.Value;
        }
        Wake.Set();
    }
}
