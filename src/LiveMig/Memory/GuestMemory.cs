using System.Runtime.CompilerServices;
using LiveMig.Linux;

namespace LiveMig.Memory;

/// <summary>
/// A VM's physical memory: one page-aligned shared mapping of a memfd, so that another
/// process or tool can map the same pages. Sparse: pages that were never written are file
/// holes and cost nothing; readers that may meet holes (hashing, round 0) find them with
/// SEEK_DATA/SEEK_HOLE instead of touching them through the mapping, which would allocate.
/// </summary>
public sealed unsafe class GuestMemory : IDisposable
{
    public const int PageSize = 4096;
    public const int PageShift = 12;
    /// <summary>Unit of the parallel hash; a hole of this size hashes as a precomputed constant.</summary>
    internal const int HashChunkPages = 512;

    private readonly int _fd;
    private nint _base;
    private PageBitmap? _softwareWriteLog;

    private GuestMemory(int fd, nint baseAddress, long size, string name)
    {
        _fd = fd;
        _base = baseAddress;
        Size = size;
        PageCount = size >> PageShift;
        Name = name;
    }

    public string Name { get; }
    public long Size { get; }
    public long PageCount { get; }
    public byte* Base => (byte*)_base;
    /// <summary>The memfd behind the mapping; other processes can map /proc/PID/fd/N.</summary>
    public int FileDescriptor => _fd;

    public static GuestMemory Create(long size, string name = "livemig-guest")
    {
        if (!OperatingSystem.IsLinux()) throw new PlatformNotSupportedException("guest memory needs Linux memfd/mmap");
        if (size <= 0 || size % PageSize != 0)
            throw new ArgumentOutOfRangeException(nameof(size), size, $"memory size must be a positive multiple of {PageSize} bytes");
        int fd = Native.memfd_create(name, Native.MFD_CLOEXEC);
        if (fd < 0) throw new IOException($"memfd_create failed: {Native.ErrorText(Native.Errno)}");
        if (Native.ftruncate(fd, size) != 0)
        {
            int e = Native.Errno; Native.close(fd);
            throw new IOException($"ftruncate({size}) of guest memory failed: {Native.ErrorText(e)}");
        }
        nint p = Native.mmap(0, (nuint)size, Native.PROT_READ | Native.PROT_WRITE, Native.MAP_SHARED | Native.MAP_NORESERVE, fd, 0);
        if (p == Native.MAP_FAILED)
        {
            int e = Native.Errno; Native.close(fd);
            throw new IOException($"mmap of {size} bytes of guest memory failed: {Native.ErrorText(e)}");
        }
        return new GuestMemory(fd, p, size, name);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Span<byte> Page(long page)
    {
        if ((ulong)page >= (ulong)PageCount) ThrowPage(page);
        return new Span<byte>((byte*)_base + (page << PageShift), PageSize);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public byte* PagePointer(long page) => (byte*)_base + (page << PageShift);

    public Span<byte> Range(long firstPage, int pageCount) =>
        new((byte*)_base + (firstPage << PageShift), pageCount << PageShift);

    private void ThrowPage(long page) => throw new ArgumentOutOfRangeException(nameof(page), page, $"page outside guest memory of {PageCount} pages");

    // ---- the guest's access path (vCPUs) --------------------------------------------------

    private DemandPager? _pager;

    /// <summary>
    /// The vCPU path to a page: like <see cref="PagePointer"/>, but during post-copy it first
    /// makes sure the page has arrived (<see cref="DemandPager.Fault"/> asks for it and waits).
    /// Outside post-copy it costs one null check. Workloads use this and <see cref="GuestPage"/>;
    /// the engine's own reads and writes use <see cref="Page"/>/<see cref="PagePointer"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public byte* GuestPointer(long page)
    {
        DemandPager? d = _pager;
        if (d is not null && !d.Present.IsSet(page)) d.Fault(page);
        return (byte*)_base + (page << PageShift);
    }

    /// <summary>The vCPU path to a page as a span (see <see cref="GuestPointer"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public Span<byte> GuestPage(long page)
    {
        if ((ulong)page >= (ulong)PageCount) ThrowPage(page);
        return new Span<byte>(GuestPointer(page), PageSize);
    }

    /// <summary>The demand pager in force (post-copy), or null.</summary>
    public DemandPager? Pager => Volatile.Read(ref _pager);

    /// <summary>
    /// Puts a pager in force, or removes it (null). A removed pager is disposed with this memory,
    /// not before: a vCPU that read the reference just before may still look at its bitmap.
    /// </summary>
    internal void AttachPager(DemandPager? pager)
    {
        var old = Interlocked.Exchange(ref _pager, pager);
        if (old is not null && !ReferenceEquals(old, pager)) lock (_retired) _retired.Add(old);
    }

    private readonly List<DemandPager> _retired = [];

    // ---- the guest's write path -------------------------------------------------------

    /// <summary>
    /// Workloads call this after writing a page. With the software dirty log attached it sets
    /// the page's bit; with kernel tracking (userfaultfd write-protect) it is a no-op branch.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void NoteWrite(long page) => _softwareWriteLog?.Set(page);

    internal void AttachSoftwareWriteLog(PageBitmap? log) => Volatile.Write(ref _softwareWriteLog, log);

    // ---- sparseness ---------------------------------------------------------------------

    /// <summary>Populated extents in pages, [first, first+count), found with SEEK_DATA/SEEK_HOLE.</summary>
    public List<(long First, long Count)> DataExtents()
    {
        var list = new List<(long, long)>();
        long off = 0;
        while (off < Size)
        {
            long data = Native.lseek(_fd, off, Native.SEEK_DATA);
            if (data < 0)
            {
                int e = Native.Errno;
                if (e == Native.ENXIO) break;
                throw new IOException($"lseek(SEEK_DATA) on guest memory failed: {Native.ErrorText(e)}");
            }
            long hole = Native.lseek(_fd, data, Native.SEEK_HOLE);
            if (hole < 0) hole = Size;
            long first = data >> PageShift, end = (hole + PageSize - 1) >> PageShift;
            list.Add((first, end - first));
            off = hole;
        }
        return list;
    }

    /// <summary>Marks every populated page in <paramref name="into"/>.</summary>
    public long MarkPopulated(PageBitmap into)
    {
        long n = 0;
        foreach (var (first, count) in DataExtents()) { into.SetRange(first, count); n += count; }
        return n;
    }

    public long PopulatedPages()
    {
        long n = 0;
        foreach (var (_, count) in DataExtents()) n += count;
        return n;
    }

    /// <summary>Pre-faults a range for writing so later writes skip the slow first touch.</summary>
    public void Populate(long firstPage, long pageCount)
    {
        Native.madvise(_base + (nint)(firstPage << PageShift), (nuint)(pageCount << PageShift), Native.MADV_POPULATE_WRITE);
    }

    // ---- verification ---------------------------------------------------------------------

    /// <summary>
    /// The verification hash (see <see cref="PageHashes"/>) computed from scratch, in parallel.
    /// Depends only on content: a hole and a written page of zeros hash the same, and holes are
    /// not touched. Call it only while no one writes (the VM is paused).
    /// </summary>
    public ulong ComputeHash(int? maxParallelism = null)
    {
        var hashes = new PageHashes(PageCount);
        var opts = new ParallelOptions { MaxDegreeOfParallelism = maxParallelism ?? Environment.ProcessorCount };
        // Populated extents only, cut into pieces of at most HashChunkPages for the workers.
        var pieces = new List<(long First, long Count)>();
        foreach (var (first, count) in DataExtents())
            for (long p = first; p < first + count; p += HashChunkPages) pieces.Add((p, Math.Min(HashChunkPages, first + count - p)));
        Parallel.ForEach(pieces, opts, piece =>
        {
            for (long p = piece.First; p < piece.First + piece.Count; p++) hashes.Set(p, new ReadOnlySpan<byte>(PagePointer(p), PageSize));
        });
        return hashes.Combine();
    }

    // ---- reads by others (the destination-wide dedup index) ------------------------------

    private readonly object _disposeLock = new();

    public bool IsDisposed => Volatile.Read(ref _base) == 0;

    /// <summary>
    /// Copies one page into <paramref name="into"/> unless this memory was disposed; safe against
    /// a concurrent <see cref="Dispose"/> (for readers that do not own the memory). The content
    /// may be changing while it is copied: such readers verify what they copied.
    /// </summary>
    public bool TryCopyPage(long page, Span<byte> into)
    {
        if ((ulong)page >= (ulong)PageCount) return false;
        lock (_disposeLock)
        {
            if (_base == 0) return false;
            new ReadOnlySpan<byte>((byte*)_base + (page << PageShift), PageSize).CopyTo(into);
            return true;
        }
    }

    public void Dispose()
    {
        nint p;
        lock (_disposeLock) p = Interlocked.Exchange(ref _base, 0);
        if (p == 0) return;
        Native.munmap(p, (nuint)Size);
        Native.close(_fd);
        lock (_retired) { foreach (var d in _retired) d.Dispose(); _retired.Clear(); }
    }
}
