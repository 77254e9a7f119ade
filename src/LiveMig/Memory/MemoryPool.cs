using System.Collections.Concurrent;

namespace LiveMig.Memory;

/// <summary>
/// Guest memory a destination agent prepares before any migration arrives, as a host keeps
/// memory ready for incoming VMs (QEMU's -mem-prealloc on a destination started ahead). Backing
/// fresh pages costs several microseconds each on virtual machines — far more than the transfer
/// — so paying it ahead takes it out of the migration. Each region is populated once (all
/// zero), handed out once, and belongs to the VM that takes it.
/// </summary>
public sealed class MemoryPool : IDisposable
{
    private readonly ConcurrentDictionary<long, ConcurrentBag<GuestMemory>> _ready = new();
    private readonly Task _preparing;

    /// <summary>Starts populating <paramref name="count"/> regions of <paramref name="size"/> bytes in the background.</summary>
    public MemoryPool(long size, int count)
    {
        if (count < 0) throw new ArgumentOutOfRangeException(nameof(count));
        Size = size;
        _preparing = Task.Run(() =>
        {
            for (int i = 0; i < count; i++)
            {
                var m = GuestMemory.Create(size, "livemig-pool");
                m.Populate(0, m.PageCount);
                _ready.GetOrAdd(size, _ => []).Add(m);
            }
        });
    }

    public long Size { get; }

    /// <summary>Waits until every region is populated (for benchmarks and tests).</summary>
    public void WaitReady() => _preparing.GetAwaiter().GetResult();

    /// <summary>A prepared region of exactly <paramref name="size"/> bytes, or null (the caller then makes fresh memory).</summary>
    public GuestMemory? Take(long size) =>
        _ready.TryGetValue(size, out var bag) && bag.TryTake(out var m) ? m : null;

    public void Dispose()
    {
        try { _preparing.GetAwaiter().GetResult(); } catch (IOException) { }
        foreach (var bag in _ready.Values) while (bag.TryTake(out var m)) m.Dispose();
    }
}
