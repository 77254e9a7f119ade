using System.Collections.Concurrent;
using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// A key-value store whose whole table lives in guest memory (<see cref="KvTable"/>), serving
/// requests from outside the VM. Requests arrive through a queue owned by this instance — the
/// VM's "virtual NIC" — that the vCPUs drain in <see cref="VcpuProgram.Step"/>; only vCPUs touch
/// the table, so a paused VM writes nothing and its requests simply wait (the downtime a client
/// sees). A VM restored elsewhere gets a new instance that finds the table in the migrated pages.
/// Parameters: <c>keys</c> (capacity, default 64k or what fits in half the memory),
/// <c>value</c> (value size in bytes, default 256, at most 4080), <c>at</c> (where the table
/// starts: a size or % of memory, default 0).
/// </summary>
public sealed class KvWorkload : Workload, IDisposable
{
    /// <summary>Requests served per Step at most, so a pause waits for one short burst only.</summary>
    private const int BatchSize = 64;
    /// <summary>How long an idle vCPU waits for a request inside Step before napping; bounds pause latency.</summary>
    private const int IdleWaitMs = 1;

    private readonly KvTable _table;
    private readonly ConcurrentQueue<KvRequest> _queue = new();
    // Wakes an idle vCPU on arrival; set only when someone waits (_sleepers), so a busy VM pays no kernel call.
    private readonly ManualResetEventSlim _arrival = new(false);
    private int _sleepers;
    // Serialises vCPUs over the table (a guest lock); never held across a Step, so it is free whenever the VM is paused.
    private readonly Lock _tableLock = new();
    private GuestMemory? _memory;
    private bool _initialisedHere;
    private volatile bool _disposed;

    public KvWorkload(WorkloadSpec spec, long memoryPages) : base(spec)
    {
        spec.CheckKnown("keys", "value", "at");
        int valueSize = (int)spec.Long("value", 256, 1, KvProtocol.MaxValueLength);
        // Pages() rejects 0 (it wants at least one page), but 0 is the natural start of a table.
        bool atZero = spec.Parameters.TryGetValue("at", out string? atText) && Units.TryParseBytes(atText, out long atBytes) && atBytes == 0;
        long at = atZero ? 0 : spec.Pages("at", 0, memoryPages);
        long room = memoryPages - at;
        long fit = KvTable.MaxCapacityFor(room, valueSize);
        if (fit < 1) throw new FormatException($"workload 'kv': no room for a table of {valueSize}-byte values in {room} pages from page {at}");
        long keys = spec.Long("keys", Math.Max(1, Math.Min(65536, KvTable.MaxCapacityFor(room / 2, valueSize))), 1, long.MaxValue);
        if (keys > fit)
            throw new FormatException($"workload 'kv' parameter keys={keys}: a table of {valueSize}-byte values from page {at} holds at most {fit} keys in this memory");
        _table = new KvTable(at, keys, valueSize);
    }

    /// <summary>Free-page hint: the store never touches memory outside its table.</summary>
    public override long FreePages(PageBitmap into)
    {
        long before = FirstPage, after = FirstPage + TablePages;
        if (before > 0) into.SetRange(0, before);
        if (after < into.PageCount) into.SetRange(after, into.PageCount - after);
        return before + Math.Max(0, into.PageCount - after);
    }

    public long Capacity => _table.Capacity;
    public int ValueSize => _table.ValueSize;
    /// <summary>The table's pages: [FirstPage, FirstPage + TablePages).</summary>
    public long FirstPage => _table.FirstPage;
    public long TablePages => _table.TablePages;
    /// <summary>Identifies the table in memory; saved with the vCPU state so a restore can tell it has the right pages.</summary>
    public ulong TableId { get; private set; }

    /// <summary>Keys in the table (from the header in guest memory).</summary>
    public long Count
    {
        get
        {
            var m = _memory ?? throw new InvalidOperationException("kv workload has no memory yet");
            lock (_tableLock) return _table.ReadCount(m);
        }
    }

    /// <summary>Requests waiting in the virtual NIC (e.g. while the VM is paused).</summary>
    public int QueuedRequests => _queue.Count;

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed)
    {
        lock (_tableLock)
        {
            if (_memory is null)
            {
                // First vCPU: adopt the table the memory holds (a restored VM), else make one (a new VM).
                // Never reinitialise a valid header: that would wipe a migrated table.
                if (_table.HeaderValid(memory, out ulong id)) TableId = id;
                else
                {
                    TableId = seed;
                    _table.Initialise(memory, seed);
                    _initialisedHere = true;
                }
                _memory = memory;
            }
            else if (!ReferenceEquals(_memory, memory)) throw new InvalidOperationException("kv workload: all vCPUs must share one guest memory");
        }
        return new Program(this);
    }

    public override string? CheckInvariant(GuestMemory memory, IReadOnlyList<VcpuProgram> programs)
    {
        lock (_tableLock) return _table.Check(memory);
    }

    /// <summary>
    /// Hands a prepared request to the VM; a vCPU serves it when the VM runs, then
    /// <see cref="KvRequest.Wait"/> returns. Thread-safe.
    /// </summary>
    public void Submit(KvRequest request)
    {
        request.MarkQueued();
        Enqueue(request);
    }

    /// <summary>Queues an already-marked request (also used to move requests between VMs).</summary>
    internal void Enqueue(KvRequest request)
    {
        _queue.Enqueue(request);
        if (_disposed) { FailQueued(); return; }
        // Dekker with WaitForArrival: the fence orders the enqueue's publishing store before this
        // read; a vCPU increments _sleepers (a full fence) before its last look at the queue, so
        // one of the two sees the other and no arrival sleeps through the vCPU's idle wait.
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref _sleepers) > 0) _arrival.Set();
    }

    /// <summary>Takes every queued request out (they were not served), for delivery to another VM.</summary>
    internal void DrainTo(List<KvRequest> into)
    {
        while (_queue.TryDequeue(out var r)) into.Add(r);
    }

    private int Serve(GuestMemory memory, int max)
    {
        int n = 0;
        while (n < max && _queue.TryDequeue(out var r))
        {
            if (!r.TryTake()) continue; // its submitter timed out: not applied, no reply
            KvStatus status;
            lock (_tableLock)
            {
                if (r.Op == KvOp.Put) status = _table.Put(memory, r.Key, r.Value);
                else
                {
                    status = _table.Get(memory, r.Key, r.Buffer, out int length);
                    r.ValueLength = length;
                }
            }
            r.Complete(status);
            n++;
        }
        return n;
    }

    private bool WaitForArrival()
    {
        Interlocked.Increment(ref _sleepers);
        try
        {
            _arrival.Reset();
            return !_queue.IsEmpty || _arrival.Wait(IdleWaitMs);
        }
        finally { Interlocked.Decrement(ref _sleepers); }
    }

    private void FailQueued()
    {
        while (_queue.TryDequeue(out var r)) r.Fail();
    }

    /// <summary>Fails whatever still waits in the queue; later submissions fail at once.</summary>
    public void Dispose()
    {
        _disposed = true;
        FailQueued();
        // _arrival is not disposed: a late Submit may still Set it, and it never made a kernel handle.
    }

    private sealed class Program(KvWorkload owner) : VcpuProgram
    {
        public override int Step(GuestMemory memory)
        {
            int n = owner.Serve(memory, BatchSize);
            if (n == 0 && owner.WaitForArrival()) n = owner.Serve(memory, BatchSize);
            Operations += n;
            return n;
        }

        public override void Save(BinaryWriter w)
        {
            w.Write(Operations);
            w.Write(owner.TableId);
        }

        public override void Load(BinaryReader r)
        {
            Operations = r.ReadInt64();
            ulong id = r.ReadUInt64();
            if (owner._initialisedHere)
                throw new InvalidDataException($"kv: the restored VM's memory holds no kv table at page {owner.FirstPage} (its pages must be in memory before Restore)");
            if (id != owner.TableId)
                throw new InvalidDataException($"kv: the table in memory (id {owner.TableId:x}) is not the VM's (id {id:x})");
        }
    }
}
