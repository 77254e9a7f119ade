namespace LiveMig.Engine;

/// <summary>
/// The memory one destination lets its incoming VMs claim, all migrations together. Each
/// Hello reserves its VM's size before anything is allocated for it; the reservation is given
/// back when the migration fails or when the VM that arrived leaves (is discarded). A Hello
/// that does not fit is refused naming the sizes. <c>DestinationOptions.MaxMemoryBytes</c>
/// bounds one VM; this bounds them all, so that a hundred Hellos claiming a large VM each cost
/// the agent no more than the budget allows (guest memory is sparse: a claim costs nothing
/// until pages arrive, but every page it claims may arrive). Thread-safe.
/// </summary>
public sealed class MemoryBudget(long bytes)
{
    private readonly Lock _lock = new();
    private long _reserved;
    private int _holders;

    /// <summary>The machine's memory less a margin for the agent and the host: an eighth of it, at least 1 GiB (half of a machine smaller than 2 GiB).</summary>
    public static long DefaultBytes => DefaultFor(MachineMemory.TotalBytes);

    public static long DefaultFor(long machineBytes) => machineBytes - Math.Max(Math.Min(1L << 30, machineBytes / 2), machineBytes / 8);

    public long Bytes { get; } = bytes > 0 ? bytes : throw new ArgumentOutOfRangeException(nameof(bytes), bytes, "a memory budget must be positive");

    /// <summary>Bytes reserved now, by migrations in progress and VMs that arrived.</summary>
    public long Reserved { get { lock (_lock) return _reserved; } }

    /// <summary>Reserves <paramref name="vmBytes"/>; null, with why in <paramref name="refusal"/>, when it does not fit.</summary>
    public Reservation? TryReserve(long vmBytes, out string? refusal)
    {
        lock (_lock)
        {
            if (vmBytes <= Bytes - _reserved)
            {
                _reserved += vmBytes;
                _holders++;
                refusal = null;
                return new Reservation(this, vmBytes);
            }
            refusal = $"a VM of {Units.Bytes(vmBytes)} does not fit this destination's memory budget of {Units.Bytes(Bytes)}"
                + (_holders == 0 ? "" : $": {Units.Bytes(_reserved)} is held by {_holders} other migration{(_holders == 1 ? " or VM" : "s or VMs")}, {Units.Bytes(Bytes - _reserved)} is free");
            return null;
        }
    }

    private void Release(long vmBytes)
    {
        lock (_lock)
        {
            _reserved -= vmBytes;
            _holders--;
        }
    }

    /// <summary>One VM's share of the budget; disposing gives it back (once).</summary>
    public sealed class Reservation : IDisposable
    {
        private MemoryBudget? _budget;

        internal Reservation(MemoryBudget budget, long bytes) => (_budget, Bytes) = (budget, bytes);

        public long Bytes { get; }

        public void Dispose() => Interlocked.Exchange(ref _budget, null)?.Release(Bytes);
    }
}
