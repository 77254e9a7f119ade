using LiveMig.Linux;
using LiveMig.Memory;
using static LiveMig.Linux.Userfaultfd;

namespace LiveMig.DirtyTracking;

/// <summary>
/// The kernel's own write tracking, for writes made through raw pointers: the guest mapping is
/// registered with userfaultfd in asynchronous write-protect mode (the kernel resolves the
/// first write to a protected page itself, no handler thread, so no managed code ever waits
/// on a fault), and <c>PAGEMAP_SCAN</c> on /proc/self/pagemap returns the written pages and
/// re-protects them in one call. Linux 6.7+. Soft-dirty would be the classic tool but is
/// often not compiled in. Sees writes through this process's mapping only. It cannot be peeked
/// at per page cheaply (<see cref="IDirtyLog.CanPeek"/> is false): asking whether one page was
/// written again since the harvest would be a PAGEMAP_SCAN system call, so the engine does not
/// skip re-written pages with this log (it re-sends them; the next harvest has them anyway).
/// </summary>
public sealed unsafe class UffdWriteProtectDirtyLog : IDirtyLog
{
    private const int RegionBatch = 4096;
    private readonly GuestMemory _memory;
    private int _uffd;
    private readonly int _pagemap;
    private readonly PageRegion[] _regions = new PageRegion[RegionBatch];

    private UffdWriteProtectDirtyLog(GuestMemory memory, int uffd, int pagemap)
    {
        _memory = memory;
        _uffd = uffd;
        _pagemap = pagemap;
    }

    public string Name => "uffd-wp";
    public bool IsTracking { get; private set; }

    public static bool TryCreate(GuestMemory memory, out UffdWriteProtectDirtyLog? log, out string? why)
    {
        log = null;
        if (!OperatingSystem.IsLinux()) { why = "not Linux"; return false; }
        int fd = (int)Native.syscall(Native.SYS_userfaultfd, Native.O_CLOEXEC | Native.O_NONBLOCK);
        if (fd < 0) fd = (int)Native.syscall(Native.SYS_userfaultfd, Native.O_CLOEXEC | Native.O_NONBLOCK | UFFD_USER_MODE_ONLY);
        if (fd < 0) { why = $"userfaultfd: {Native.ErrorText(Native.Errno)}"; return false; }
        var api = new UffdioApi { Api = UFFD_API, Features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
        if (Native.ioctl(fd, UFFDIO_API, &api) != 0)
        {
            why = $"UFFDIO_API without async write-protect (kernel older than 6.7?): {Native.ErrorText(Native.Errno)}";
            Native.close(fd);
            return false;
        }
        int pm = Native.open("/proc/self/pagemap", Native.O_RDONLY | Native.O_CLOEXEC);
        if (pm < 0) { why = $"open /proc/self/pagemap: {Native.ErrorText(Native.Errno)}"; Native.close(fd); return false; }
        log = new UffdWriteProtectDirtyLog(memory, fd, pm);
        if (!Probe.Value.Works)
        {
            log.Dispose();
            log = null;
            why = Probe.Value.Why;
            return false;
        }
        why = null;
        return true;
    }

    /// <summary>
    /// Some kernels accept WP_ASYNC but lack the scan ioctl: try register + write + scan +
    /// unregister once per process, on a small scratch mapping (not the guest's memory, whose
    /// registration costs milliseconds per GiB).
    /// </summary>
    private static readonly Lazy<(bool Works, string? Why)> Probe = new(() =>
    {
        using var scratch = GuestMemory.Create(64 * GuestMemory.PageSize, "livemig-uffd-probe");
        int fd = (int)Native.syscall(Native.SYS_userfaultfd, Native.O_CLOEXEC | Native.O_NONBLOCK);
        if (fd < 0) fd = (int)Native.syscall(Native.SYS_userfaultfd, Native.O_CLOEXEC | Native.O_NONBLOCK | UFFD_USER_MODE_ONLY);
        var api = new UffdioApi { Api = UFFD_API, Features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM };
        if (fd < 0 || Native.ioctl(fd, UFFDIO_API, &api) != 0) return (false, "userfaultfd probe failed");
        int pm = Native.open("/proc/self/pagemap", Native.O_RDONLY | Native.O_CLOEXEC);
        using var probe = new UffdWriteProtectDirtyLog(scratch, fd, pm);
        try
        {
            probe.Start();
            scratch.Page(5)[0] = 1;
            var seen = new PageBitmap(scratch.PageCount);
            long n = probe.Harvest(seen);
            probe.Stop();
            return n == 1 && seen.IsSet(5) ? (true, null) : (false, $"PAGEMAP_SCAN reported {n} written pages where 1 was written");
        }
        catch (IOException e) { return (false, e.Message); }
    });

    public void Start()
    {
        var reg = new UffdioRegister { Range = Range, Mode = UFFDIO_REGISTER_MODE_WP };
        if (Native.ioctl(_uffd, UFFDIO_REGISTER, &reg) != 0) throw Fail("UFFDIO_REGISTER(WP)");
        var wp = new UffdioWriteProtect { Range = Range, Mode = UFFDIO_WRITEPROTECT_MODE_WP };
        if (Native.ioctl(_uffd, UFFDIO_WRITEPROTECT, &wp) != 0) throw Fail("UFFDIO_WRITEPROTECT");
        IsTracking = true;
    }

    private UffdioRange Range => new() { Start = (ulong)_memory.Base, Len = (ulong)_memory.Size };

    public long Harvest(PageBitmap into)
    {
        if (!IsTracking) return 0;
        long pages = _memory.PageCount;
        if (pages < ParallelFromPages || Environment.ProcessorCount < 2) return Scan(0, pages, into, _regions);
        // The walk costs ~2 ns a page (10 ms for 4 GiB here) and it is downtime at a switch,
        // when the vCPUs are paused and the cores idle: two halves at once. The split is on a
        // 64-page boundary, so the halves set different words of the bitmap.
        long half = (pages / 2) & ~63L;
        var second = Task.Run(() => Scan(half, pages - half, into, _regions2 ??= new PageRegion[RegionBatch]));
        long first = Scan(0, half, into, _regions);
        return first + second.GetAwaiter().GetResult();
    }

    private const long ParallelFromPages = 1L << 18; // 1 GiB
    private PageRegion[]? _regions2;

    /// <summary>One PAGEMAP_SCAN walk per range: its cost is the page-table walk, so a few ranges (the holes of a populated guest) cost far less than the whole mapping.</summary>
    public long HarvestWithin(IReadOnlyList<(long First, long Count)> ranges, PageBitmap into)
    {
        if (!IsTracking) return 0;
        long pages = 0;
        foreach (var (first, count) in ranges) pages += Scan(first, count, into, _regions);
        return pages;
    }

    private long Scan(long firstPage, long pageCount, PageBitmap into, PageRegion[] regions)
    {
        ulong baseAddr = (ulong)_memory.Base;
        ulong end = baseAddr + ((ulong)(firstPage + pageCount) << GuestMemory.PageShift);
        long pages = 0;
        fixed (PageRegion* vec = regions)
        {
            ulong start = baseAddr + ((ulong)firstPage << GuestMemory.PageShift);
            while (start < end)
            {
                var arg = new PmScanArg
                {
                    Size = (ulong)sizeof(PmScanArg),
                    Flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    Start = start,
                    End = end,
                    Vec = (ulong)vec,
                    VecLen = RegionBatch,
                    CategoryMask = PAGE_IS_WRITTEN,
                    ReturnMask = PAGE_IS_WRITTEN,
                };
                int n = Native.ioctl(_pagemap, PAGEMAP_SCAN, &arg);
                if (n < 0) throw Fail("PAGEMAP_SCAN");
                for (int i = 0; i < n; i++)
                {
                    long first = (long)((vec[i].Start - baseAddr) >> GuestMemory.PageShift);
                    long count = (long)((vec[i].End - vec[i].Start) >> GuestMemory.PageShift);
                    into.SetRange(first, count);
                    pages += count;
                }
                if (arg.WalkEnd <= start) break;
                start = arg.WalkEnd;
            }
        }
        return pages;
    }

    public void Stop()
    {
        if (!IsTracking) return;
        var range = Range;
        Native.ioctl(_uffd, UFFDIO_UNREGISTER, &range);
        IsTracking = false;
    }

    private static IOException Fail(string what) => new($"{what} failed: {Native.ErrorText(Native.Errno)}");

    public void Dispose()
    {
        Stop();
        int fd = Interlocked.Exchange(ref _uffd, -1);
        if (fd >= 0) { Native.close(fd); Native.close(_pagemap); }
    }
}
