namespace LiveMig.Vm;

/// <summary>
/// vCPU threads started before the VM they will run exists (the destination makes them when a
/// migration's Hello arrives), so that restoring the VM in the switch-over hands them their
/// work instead of creating threads: creating one and waiting for it to be scheduled took
/// 0.7–7 ms of downtime on a busy 2-core machine. Each thread waits, then runs what
/// <see cref="Take"/> gives it, once. Disposing untaken threads ends them.
/// </summary>
public sealed class ParkedThreads : IDisposable
{
    private readonly object _gate = new();
    private readonly Thread[] _threads;
    private readonly Action?[] _work;
    private bool _taken, _disposed;

    public ParkedThreads(int count, string name)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(count);
        _threads = new Thread[count];
        _work = new Action?[count];
        for (int i = 0; i < count; i++)
        {
            int k = i;
            _threads[i] = new Thread(() => Run(k)) { IsBackground = true, Name = $"{name}/vcpu{i}" };
            _threads[i].Start();
        }
    }

    public int Count => _threads.Length;

    private void Run(int k)
    {
        Action? work;
        lock (_gate)
        {
            while (_work[k] is null && !_disposed) Monitor.Wait(_gate);
            work = _work[k];
        }
        work?.Invoke();
    }

    /// <summary>
    /// Gives thread i the work <paramref name="body"/>(i) and returns the threads; null (nothing
    /// taken) when the count differs, or they were taken or disposed already.
    /// </summary>
    public Thread[]? Take(int count, Func<int, Action> body)
    {
        lock (_gate)
        {
            if (_taken || _disposed || count != _threads.Length) return null;
            _taken = true;
            for (int i = 0; i < count; i++) _work[i] = body(i);
            Monitor.PulseAll(_gate);
            return _threads;
        }
    }

    /// <summary>Ends the threads if nobody took them (they then never ran anything).</summary>
    public void Dispose()
    {
        lock (_gate)
        {
            if (_taken || _disposed) return;
            _disposed = true;
            Monitor.PulseAll(_gate);
        }
        foreach (var t in _threads) t.Join();
    }
}
