using System.Diagnostics;
using System.IO.Hashing;
using System.Runtime.InteropServices;

namespace LiveMig.Memory;

/// <summary>A vCPU needed a page that can no longer arrive (the migration was abandoned).</summary>
public sealed class PageUnavailableException(string message) : Exception(message);

/// <summary>Who fetches a missing page: the post-copy session sends the request to the source.</summary>
public interface IPageRequester
{
    /// <summary>Asks the source for <paramref name="page"/>; must not block on the network for long (a broken channel queues it).</summary>
    void Request(long page);
}

/// <summary>
/// Demand paging of a guest's memory during post-copy. A page is <em>present</em> once its
/// content is final on this side (it arrived, or it was never going to come); the vCPU access
/// path (<see cref="GuestMemory.GuestPointer"/>) checks the bit and calls <see cref="Fault"/>
/// for a missing page, which returns once the page is placed. Pages are placed by
/// <see cref="Place"/>, which makes sure a page is placed once (a page the guest may already
/// have written is never overwritten) and hashes exactly what it placed, for verification.
/// </summary>
public abstract unsafe class DemandPager : IDisposable
{
    private readonly object _gate = new();
    private int _waiters;
    private long _remaining;
    private volatile string? _abandoned;
    private ulong* _hashes;

    protected DemandPager(GuestMemory memory, NativePageBitmap present, PageHashes? initialHashes)
    {
        Memory = memory;
        Present = present;
        _remaining = memory.PageCount - present.Count();
        if (initialHashes is not null)
        {
            // The pages' hashes so far are the array to go on with: borrowed (pinned), not copied.
            if (initialHashes.Values.Length != memory.PageCount) throw new ArgumentException("hashes and memory differ in size", nameof(initialHashes));
            _borrowed = initialHashes;
            _hashes = initialHashes.Pointer;
            return;
        }
        _hashes = (ulong*)NativeMemory.Alloc((nuint)(memory.PageCount * 8));
        new Span<ulong>(_hashes, checked((int)memory.PageCount)).Fill(PageHashes.ZeroPageHash);
    }

    private readonly PageHashes? _borrowed; // keeps the borrowed array alive (and says not to free it)

    public GuestMemory Memory { get; }
    /// <summary>Pages whose content is final here.</summary>
    public NativePageBitmap Present { get; }
    /// <summary><c>portable</c> or <c>userfaultfd</c>.</summary>
    public abstract string Mode { get; }
    /// <summary>Per-page hashes of what was placed (and, for pages present from the start, of what they held then).</summary>
    internal ulong* Hashes => _hashes;
    public LatencyRecorder Latency { get; } = new();
    /// <summary>Pages still missing.</summary>
    public virtual long Remaining => Volatile.Read(ref _remaining);
    public long Faults => Latency.Count;

    /// <summary>The vCPU path met a missing page: get it and return once it is present.</summary>
    public abstract void Fault(long page);

    /// <summary>Places a page's final content (empty span = zero page); false when it was already placed.</summary>
    public abstract bool Place(long page, ReadOnlySpan<byte> content);

    /// <summary>Pages made present as zero pages without being placed (capability LateZeros: announced pending, then declared zero by the source).</summary>
    public virtual long LateZeros => 0;

    /// <summary>Most pages <see cref="PlaceRun"/> takes at once (one bit each in its answer).</summary>
    public const int MaxRunPages = 64;

    /// <summary>
    /// Places <paramref name="count"/> (≤ <see cref="MaxRunPages"/>) consecutive pages from
    /// <paramref name="first"/> on, whose contents lie back to back in <paramref name="contents"/>;
    /// returns a mask of those placed (bit i: page first + i; the others were there already).
    /// The userfaultfd pager places a run with one <c>UFFDIO_COPY</c>.
    /// </summary>
    public virtual ulong PlaceRun(long first, int count, ReadOnlySpan<byte> contents)
    {
        ulong placed = 0;
        for (int i = 0; i < count; i++)
            if (Place(first + i, contents.Slice(i * GuestMemory.PageSize, GuestMemory.PageSize))) placed |= 1UL << i;
        return placed;
    }

    /// <summary>Stops demand paging for good: waiting and later faults throw <see cref="PageUnavailableException"/>.</summary>
    public virtual void Abandon(string why)
    {
        _abandoned = why;
        lock (_gate) Monitor.PulseAll(_gate);
    }

    public bool IsAbandoned => _abandoned is not null;

    /// <summary>The memory hash (see <see cref="PageHashes"/>) over the hashes of what was placed.</summary>
    public ulong CombineHashes() => XxHash3.HashToUInt64(new ReadOnlySpan<byte>(_hashes, checked((int)(Memory.PageCount * 8))));

    protected void RecordHash(long page, ReadOnlySpan<byte> content) =>
        _hashes[page] = content.IsEmpty ? PageHashes.ZeroPageHash : XxHash3.HashToUInt64(content);

    /// <summary>Called after pages became present: counts them and wakes waiting vCPUs.</summary>
    protected void OnPlaced(int pages)
    {
        if (pages > 0 && Interlocked.Add(ref _remaining, -pages) == 0) { lock (_gate) Monitor.PulseAll(_gate); return; }
        // Dekker with WaitPresent: the caller's Interlocked set of the present bit is a full fence before this read.
        if (Volatile.Read(ref _waiters) > 0) lock (_gate) Monitor.PulseAll(_gate);
    }

    /// <summary>Blocks until <paramref name="page"/> is present (preemptive wait: a GC never waits for this thread).</summary>
    protected void WaitPresent(long page)
    {
        var spin = new SpinWait();
        for (int i = 0; i < 8 && !Present.IsSet(page); i++) spin.SpinOnce(sleep1Threshold: -1);
        if (Present.IsSet(page)) return;
        Interlocked.Increment(ref _waiters); // a full fence before the re-check below
        try
        {
            lock (_gate)
            {
                while (!Present.IsSet(page))
                {
                    if (_abandoned is { } why) throw new PageUnavailableException($"guest page {page} cannot arrive: {why}");
                    Monitor.Wait(_gate);
                }
            }
        }
        finally { Interlocked.Decrement(ref _waiters); }
    }

    /// <summary>Waits until every page is present; false on timeout or when abandoned.</summary>
    public bool WaitAllPresent(TimeSpan timeout, Func<bool>? keepWaiting = null)
    {
        long deadline = Stopwatch.GetTimestamp() + (long)(timeout.TotalSeconds * Stopwatch.Frequency);
        Interlocked.Increment(ref _waiters);
        try
        {
            lock (_gate)
            {
                while (Remaining > 0)
                {
                    if (_abandoned is not null || (keepWaiting is not null && !keepWaiting())) return false;
                    long left = deadline - Stopwatch.GetTimestamp();
                    if (left <= 0) return false;
                    // Bounded slices: native placements (userfaultfd) do not pulse this gate.
                    Monitor.Wait(_gate, (int)Math.Clamp(left * 1000 / Stopwatch.Frequency, 1, 5));
                }
                return true;
            }
        }
        finally { Interlocked.Decrement(ref _waiters); }
    }

    /// <summary>Frees the bitmaps and hashes: only once nothing can touch the memory's access path (the memory disposes retired pagers).</summary>
    protected virtual void Dispose(bool disposing)
    {
        ulong* h = _hashes;
        _hashes = null;
        if (h != null && _borrowed is null) NativeMemory.Free(h);
        Present.Dispose();
    }

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }
}

/// <summary>
/// The portable pager: presence is only a bitmap checked on the vCPU access path; a vCPU that
/// meets a missing page asks the requester once and waits on a monitor (a preemptive wait, so a
/// garbage collection never waits for it), and pages are copied into memory by managed code.
/// Works on any kernel and with any transport.
/// </summary>
public sealed unsafe class PortableDemandPager : DemandPager
{
    private readonly NativePageBitmap _claimed;
    private readonly NativePageBitmap _requested;
    private readonly IPageRequester _requester;

    public PortableDemandPager(GuestMemory memory, NativePageBitmap present, PageHashes? initialHashes, IPageRequester requester)
        : base(memory, present, initialHashes)
    {
        _requester = requester;
        _claimed = new NativePageBitmap(memory.PageCount);
        _requested = new NativePageBitmap(memory.PageCount);
        for (long i = 0; i < present.WordCount; i++) _claimed.SetWord(i, present.Word(i));
    }

    public override string Mode => "portable";

    /// <summary>Pages asked for and not yet present (to ask again on a new connection).</summary>
    public List<long> Outstanding()
    {
        var list = new List<long>();
        for (long p = _requested.NextSet(0); p >= 0; p = _requested.NextSet(p + 1))
            if (!Present.IsSet(p)) list.Add(p);
        return list;
    }

    public override void Fault(long page)
    {
        if ((ulong)page >= (ulong)Memory.PageCount) throw new ArgumentOutOfRangeException(nameof(page));
        long t0 = Stopwatch.GetTimestamp();
        if (_requested.TrySet(page) && !Present.IsSet(page)) _requester.Request(page);
        WaitPresent(page);
        Latency.Record(Stopwatch.GetTimestamp() - t0);
    }

    /// <summary>
    /// A page announced as still to come that the source then declared zero (a LateZeros frame):
    /// present as a zero page. Nothing is written — it was never placed, so its memory is zero —
    /// and nothing is counted if it is here already.
    /// </summary>
    public bool MarkZero(long page)
    {
        if ((ulong)page >= (ulong)Memory.PageCount) throw new ArgumentOutOfRangeException(nameof(page));
        if (!_claimed.TrySet(page)) return false;
        RecordHash(page, ReadOnlySpan<byte>.Empty);
        Present.Set(page);
        Interlocked.Increment(ref _lateZeros);
        OnPlaced(1);
        return true;
    }

    private long _lateZeros;
    public override long LateZeros => Interlocked.Read(ref _lateZeros);

    public override bool Place(long page, ReadOnlySpan<byte> content)
    {
        // Claim first: two placers of one page (a push and an answer to a request after a
        // reconnection) must not both copy, or the second could overwrite a guest write.
        if (!_claimed.TrySet(page)) return false;
        Span<byte> target = Memory.Page(page);
        if (content.IsEmpty) target.Clear(); else content.CopyTo(target);
        RecordHash(page, content);
        Present.Set(page);
        OnPlaced(1);
        return true;
    }

    protected override void Dispose(bool disposing)
    {
        base.Dispose(disposing);
        _claimed.Dispose();
        _requested.Dispose();
    }
}

/// <summary>Latencies in Stopwatch ticks, recorded from many threads without locks (the first million kept).</summary>
public sealed class LatencyRecorder
{
    private readonly long[] _samples = new long[1 << 20];
    private long _count;
    private long _max;

    public long Count => Interlocked.Read(ref _count);

    public void Record(long ticks)
    {
        long i = Interlocked.Increment(ref _count) - 1;
        if (i < _samples.Length) _samples[i] = ticks;
        long m;
        while (ticks > (m = Volatile.Read(ref _max)) && Interlocked.CompareExchange(ref _max, ticks, m) != m) { }
    }

    /// <summary>Adds a latency measured on any clock.</summary>
    public void Record(TimeSpan latency) => Record((long)(latency.TotalSeconds * Stopwatch.Frequency));

    /// <summary>Adds latencies measured elsewhere (e.g. by the native fault-service thread), in nanoseconds.</summary>
    public void RecordNanoseconds(ReadOnlySpan<long> ns)
    {
        foreach (long n in ns) Record((long)(n * (double)Stopwatch.Frequency / 1e9));
    }

    /// <summary>(p50, p99, max) in microseconds, zeros when nothing was recorded.</summary>
    public (double P50, double P99, double Max) Summary()
    {
        int n = (int)Math.Min(Count, _samples.Length);
        if (n == 0) return (0, 0, 0);
        var copy = _samples.AsSpan(0, n).ToArray();
        Array.Sort(copy);
        double us(long t) => t * 1e6 / Stopwatch.Frequency;
        return (us(copy[(int)Math.Min(n - 1, (long)(n * 0.50))]), us(copy[(int)Math.Min(n - 1, (long)(n * 0.99))]), us(Volatile.Read(ref _max)));
    }
}
