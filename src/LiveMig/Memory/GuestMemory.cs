using System.Runtime.CompilerServices;
using LiveMig.Linux;

namespace LiveMig.Memory;

/// <summary>
/// A VM's physical memory: one page-aligned shared mapping, so that another process or tool can
/// map the same pages. Made as its own memfd (<see cref="Create"/>), or over existing memory —
/// a file such as QEMU's <c>memory-backend-file</c> (<see cref="Open(string, long?, long)"/>),
/// a descriptor (<see cref="FromDescriptor"/>), or several of them, mapped back to back into one
/// reserved address range (<see cref="Open(IReadOnlyList{GuestMemoryRegion})"/>): page n is always
/// base + n × 4096, with no lookup on the hot path. Sparse: pages that were never written are
/// file holes and cost nothing; readers that may meet holes (hashing, round 0) find them with
/// SEEK_DATA/SEEK_HOLE instead of touching them through the mapping, which would allocate.
/// </summary>
public sealed unsafe class GuestMemory : IDisposable
{
    public const int PageSize = 4096;
    public const int PageShift = 12;
    /// <summary>Unit of the parallel hash; a hole of this size hashes as a precomputed constant.</summary>
    internal const int HashChunkPages = 512;

    /// <summary>A file mapped at guest pages [FirstPage, FirstPage + Pages), from FileOffset in it.</summary>
    private readonly record struct Backing(int Fd, long FileOffset, long FirstPage, long Pages, bool Owns, string What);

    private readonly Backing[] _backings;
    private nint _base;
    private PageBitmap? _softwareWriteLog;

    private GuestMemory(Backing[] backings, nint baseAddress, long size, string name)
    {
        _backings = backings;
        _base = baseAddress;
        Size = size;
        PageCount = size >> PageShift;
        Name = name;
    }

    public string Name { get; }
    public long Size { get; }
    public long PageCount { get; }
    public byte* Base => (byte*)_base;
    /// <summary>The descriptor behind the mapping (of its first region); other processes can map /proc/PID/fd/N.</summary>
    public int FileDescriptor => _backings[0].Fd;
    /// <summary>How many files (regions) back this memory.</summary>
    public int RegionCount => _backings.Length;

    /// <summary>New zeroed memory of its own: a memfd of <paramref name="size"/> bytes.</summary>
    public static GuestMemory Create(long size, string name = "livemig-guest")
    {
        RequireLinux();
        if (size <= 0 || size % PageSize != 0)
            throw new ArgumentOutOfRangeException(nameof(size), size, $"memory size must be a positive multiple of {PageSize} bytes");
        int fd = Native.memfd_create(name, Native.MFD_CLOEXEC);
        if (fd < 0) throw new IOException($"memfd_create failed: {Native.ErrorText(Native.Errno)}");
        if (Native.ftruncate(fd, size) != 0)
        {
            int e = Native.Errno; Native.close(fd);
            throw new IOException($"ftruncate({size}) of guest memory failed: {Native.ErrorText(e)}");
        }
        try { return Map([new Backing(fd, 0, 0, size >> PageShift, Owns: true, name)], name); }
        catch (IOException) { Native.close(fd); throw; }
    }

    /// <summary>
    /// Memory over an existing file (e.g. /dev/shm/…, QEMU's memory-backend-file), mapped shared:
    /// <paramref name="size"/> bytes from <paramref name="offset"/> (default: the rest of the
    /// file). Errors name the path: <see cref="IOException"/> for a missing or short file,
    /// <see cref="ArgumentException"/> for a size or offset that is not a page multiple.
    /// </summary>
    public static GuestMemory Open(string path, long? size = null, long offset = 0) =>
        Open([GuestMemoryRegion.File(path, size ?? -1, offset)]);

    /// <summary>Memory over an open descriptor; closed on Dispose only if <paramref name="ownsDescriptor"/>.</summary>
    public static GuestMemory FromDescriptor(int fd, long size, bool ownsDescriptor) =>
        Open([GuestMemoryRegion.FromDescriptor(fd, size, ownsDescriptor)]);

    /// <summary>
    /// Memory made of several regions, each a file or descriptor, mapped back to back in the
    /// order given (region i's pages follow region i−1's). On failure nothing stays mapped, files
    /// opened by path are closed, and descriptors passed in stay the caller's.
    /// </summary>
    public static GuestMemory Open(IReadOnlyList<GuestMemoryRegion> regions)
    {
        RequireLinux();
        if (regions.Count == 0) throw new ArgumentException("guest memory needs at least one region", nameof(regions));
        var backings = new List<Backing>(regions.Count);
        try
        {
            long pages = 0;
            foreach (var r in regions)
            {
                var b = Back(r, pages);
                backings.Add(b);
                pages += b.Pages;
            }
            return Map([.. backings], regions.Count == 1 ? regions[0].What : $"{regions[0].What} (+{regions.Count - 1} regions)");
        }
        catch
        {
            // Only files opened here are ours to close: descriptors passed in stay the caller's.
            foreach (var (b, r) in backings.Zip(regions)) if (r.Path is not null) Native.close(b.Fd);
            throw;
        }
    }

    private static void RequireLinux()
    {
        if (!OperatingSystem.IsLinux()) throw new PlatformNotSupportedException("guest memory needs Linux memfd/mmap");
    }

    /// <summary>Opens (if a path) and checks one region; it will sit at guest page <paramref name="firstPage"/>.</summary>
    private static Backing Back(GuestMemoryRegion r, long firstPage)
    {
        string what = r.What;
        if (r.Path is null && r.Descriptor < 0) throw new ArgumentException($"guest memory region {what}: neither a path nor a descriptor");
        if (r.Offset < 0 || r.Offset % PageSize != 0) throw new ArgumentException($"guest memory {what}: offset {r.Offset} is not a multiple of {PageSize} bytes");
        if (r.Size != -1 && (r.Size <= 0 || r.Size % PageSize != 0)) throw new ArgumentException($"guest memory {what}: size {r.Size} is not a positive multiple of {PageSize} bytes");
        int fd = r.Descriptor;
        if (r.Path is not null)
        {
            fd = Native.open(r.Path, Native.O_RDWR | Native.O_CLOEXEC);
            if (fd < 0) throw new IOException($"cannot open guest memory file {what}: {Native.ErrorText(Native.Errno)}");
        }
        try
        {
            long length = FileLength(fd, what);
            long size = r.Size == -1 ? length - r.Offset : r.Size;
            if (r.Size == -1 && (size <= 0 || size % PageSize != 0))
                throw new ArgumentException($"guest memory {what}: its {length} bytes from offset {r.Offset} are not a positive multiple of {PageSize} bytes");
            if (length < r.Offset + size)
                throw new IOException($"guest memory {what} is {length} bytes, shorter than the {r.Offset + size} bytes asked for (offset {r.Offset} + size {size})");
            return new Backing(fd, r.Offset, firstPage, size >> PageShift, Owns: r.Path is not null || r.OwnsDescriptor, what);
        }
        catch
        {
            if (r.Path is not null) Native.close(fd);
            throw;
        }
    }

    private static long FileLength(int fd, string what)
    {
        try
        {
            using var handle = new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: false);
            return RandomAccess.GetLength(handle);
        }
        catch (Exception e) when (e is UnauthorizedAccessException or NotSupportedException) { throw new IOException($"guest memory {what}: cannot tell its size: {e.Message}", e); }
    }

    /// <summary>
    /// Reserves one address range for every backing (PROT_NONE), then maps each into its place
    /// (MAP_FIXED | MAP_SHARED). On failure unmaps the range; the caller closes the descriptors.
    /// </summary>
    private static GuestMemory Map(Backing[] backings, string name)
    {
        long size = 0;
        foreach (var b in backings) size += b.Pages << PageShift;
        nint p = Native.mmap(0, (nuint)size, Native.PROT_NONE, Native.MAP_PRIVATE | Native.MAP_ANONYMOUS | Native.MAP_NORESERVE, -1, 0);
        string? error = p == Native.MAP_FAILED ? $"reserving {size} bytes of address space for guest memory failed: {Native.ErrorText(Native.Errno)}" : null;
        for (int i = 0; error is null && i < backings.Length; i++)
        {
            var b = backings[i];
            nint at = p + (nint)(b.FirstPage << PageShift);
            if (Native.mmap(at, (nuint)(b.Pages << PageShift), Native.PROT_READ | Native.PROT_WRITE, Native.MAP_SHARED | Native.MAP_FIXED | Native.MAP_NORESERVE, b.Fd, b.FileOffset) != at)
                error = $"mmap of guest memory {b.What} ({b.Pages << PageShift} bytes at offset {b.FileOffset}) failed: {Native.ErrorText(Native.Errno)}";
        }
        if (error is null) return new GuestMemory(backings, p, size, name);
        if (p != Native.MAP_FAILED) Native.munmap(p, (nuint)size);
        throw new IOException(error);
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

    /// <summary>Populated extents in pages, [first, first+count), ascending, found with SEEK_DATA/SEEK_HOLE in each region's file.</summary>
    public List<(long First, long Count)> DataExtents()
    {
        var list = new List<(long First, long Count)>();
        foreach (var b in _backings) AddExtents(b, list);
        return list;
    }

    private static void AddExtents(Backing b, List<(long First, long Count)> into)
    {
        long end = b.FileOffset + (b.Pages << PageShift);
        long off = b.FileOffset;
        while (off < end)
        {
            long data = Native.lseek(b.Fd, off, Native.SEEK_DATA);
            if (data < 0)
            {
                int e = Native.Errno;
                if (e == Native.ENXIO) break;
                throw new IOException($"lseek(SEEK_DATA) on guest memory {b.What} failed: {Native.ErrorText(e)}");
            }
            if (data >= end) break;
            long hole = Native.lseek(b.Fd, data, Native.SEEK_HOLE);
            if (hole < 0 || hole > end) hole = end;
            long first = b.FirstPage + ((data - b.FileOffset) >> PageShift), last = b.FirstPage + ((hole - b.FileOffset + PageSize - 1) >> PageShift);
            // Data running on across a region boundary is one extent.
            if (into.Count > 0 && into[^1].First + into[^1].Count == first) into[^1] = (into[^1].First, last - into[^1].First);
            else into.Add((first, last - first));
            off = hole;
        }
    }

    /// <summary>Frees the backing of pages [first, first+count) in their files (they read as zero holes again); null, or why it failed.</summary>
    internal string? PunchHole(long firstPage, long pageCount)
    {
        foreach (var b in _backings)
        {
            long from = Math.Max(firstPage, b.FirstPage), to = Math.Min(firstPage + pageCount, b.FirstPage + b.Pages);
            if (from >= to) continue;
            if (Native.fallocate(b.Fd, Native.FALLOC_FL_PUNCH_HOLE | Native.FALLOC_FL_KEEP_SIZE, b.FileOffset + ((from - b.FirstPage) << PageShift), (to - from) << PageShift) != 0)
                return $"fallocate(PUNCH_HOLE) on {b.What}: {Native.ErrorText(Native.Errno)}";
        }
        return null;
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
        Native.munmap(p, (nuint)Size); // every region's mapping lies in the one reserved range
        foreach (var b in _backings) if (b.Owns) Native.close(b.Fd);
        lock (_retired) { foreach (var d in _retired) d.Dispose(); _retired.Clear(); }
    }
}
