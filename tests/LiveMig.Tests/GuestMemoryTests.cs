using LiveMig.Memory;

namespace LiveMig.Tests;

public class GuestMemoryTests
{
    [Fact]
    public void Large_memory_is_sparse_until_written()
    {
        using var mem = GuestMemory.Create(16L << 30);
        Assert.Equal((16L << 30) / 4096, mem.PageCount);
        Assert.Equal(0, mem.PopulatedPages());
        mem.Page(1_000_000)[5] = 1;
        Assert.Equal(1, mem.PopulatedPages());
    }

    [Fact]
    public void Hash_depends_on_content_only_and_sees_a_single_byte()
    {
        using var a = GuestMemory.Create(64L << 20);
        using var b = GuestMemory.Create(64L << 20);
        // a: a written page of zeros; b: a hole at the same place. Same content, same hash.
        a.Page(10).Clear();
        a.Page(10)[0] = 0;
        Assert.Equal(a.ComputeHash(), b.ComputeHash());
        Assert.True(a.PopulatedPages() > 0);
        b.Page(16383)[4095] = 1;
        Assert.NotEqual(a.ComputeHash(), b.ComputeHash());
        a.Page(16383)[4095] = 1;
        Assert.Equal(a.ComputeHash(), b.ComputeHash());
        // Nothing new was allocated by hashing (holes are not touched).
        Assert.Equal(1, b.PopulatedPages());
    }

    [Fact]
    public void Bad_sizes_are_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => GuestMemory.Create(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => GuestMemory.Create(-4096));
        Assert.Throws<ArgumentOutOfRangeException>(() => GuestMemory.Create(4097));
    }
}

/// <summary>Guest memory over existing files and descriptors (QEMU's memory-backend-file), in one or several regions.</summary>
public sealed class GuestMemoryOpenTests : IDisposable
{
    private readonly List<string> _files = [];

    /// <summary>A sparse file in /dev/shm of <paramref name="size"/> bytes, with <paramref name="pages"/> (page index → fill byte) written.</summary>
    private string ShmFile(long size, params (long Page, byte Fill)[] pages)
    {
        string path = $"/dev/shm/livemig-test-{Guid.NewGuid():N}";
        _files.Add(path);
        using var f = new FileStream(path, FileMode.CreateNew, FileAccess.ReadWrite);
        f.SetLength(size);
        foreach (var (page, fill) in pages)
        {
            f.Position = page * GuestMemory.PageSize;
            f.Write(Enumerable.Repeat(fill, GuestMemory.PageSize).ToArray());
        }
        return path;
    }

    public void Dispose()
    {
        foreach (var f in _files) File.Delete(f);
    }

    /// <summary>Whether descriptor <paramref name="fd"/> is open on <paramref name="path"/> (a number another test reuses does not count).</summary>
    private static bool IsOpen(int fd, string path) => LinkTarget($"/proc/self/fd/{fd}") == path;

    private static string? LinkTarget(string fd)
    {
        try { return new FileInfo(fd).LinkTarget; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return null; } // closed meanwhile
    }

    [Fact]
    public void A_file_written_through_another_mapping_is_seen_both_ways()
    {
        string path = ShmFile(4L << 20, (3, 0xAB));
        using var mem = GuestMemory.Open(path);
        Assert.Equal((4L << 20) / GuestMemory.PageSize, mem.PageCount);
        Assert.Equal(0xAB, mem.Page(3)[100]);
        using var other = GuestMemory.Open(path); // another mapping of the same file, as QEMU's would be
        other.Page(7)[5] = 0x42;
        Assert.Equal(0x42, mem.Page(7)[5]);
        mem.Page(9)[0] = 0x17;
        using (var f = new FileStream(path, FileMode.Open, FileAccess.Read))
        {
            f.Position = 9L * GuestMemory.PageSize;
            Assert.Equal(0x17, f.ReadByte());
        }
        Assert.Equal([(3L, 1L), (7L, 1L), (9L, 1L)], mem.DataExtents());
        Assert.Equal(other.ComputeHash(), mem.ComputeHash());
    }

    [Fact]
    public void Two_regions_are_one_contiguous_memory_with_global_page_numbers()
    {
        const int P = GuestMemory.PageSize;
        string a = ShmFile(2L << 20, (0, 1), (511, 2));              // 512 pages; data at both ends
        string b = ShmFile(4L << 20, (100, 9), (256, 3), (300, 4)); // pages 256.. of it become guest pages 512..
        using var handle = File.OpenHandle(b, FileMode.Open, FileAccess.ReadWrite);
        int fd = (int)handle.DangerousGetHandle();
        using (var mem = GuestMemory.Open([GuestMemoryRegion.File(a, 2L << 20), GuestMemoryRegion.FromDescriptor(fd, 3L << 20, ownsDescriptor: false, offset: 1L << 20)]))
        {
            Assert.Equal(2, mem.RegionCount);
            Assert.Equal(512 + 768, mem.PageCount);
            Assert.Equal(1, mem.Page(0)[0]);
            Assert.Equal(2, mem.Page(511)[P - 1]);
            Assert.Equal(3, mem.Page(512)[0]);  // one base pointer: no seam between the regions
            unsafe { Assert.True(mem.PagePointer(512) == mem.PagePointer(511) + P); }
            Assert.Equal(4, mem.Page(512 + 44)[0]);
            // Page 100 of b is before the region's offset: not part of this memory.
            Assert.Equal([(0L, 1L), (511L, 2L), (556L, 1L)], mem.DataExtents()); // 511 and 512 join across the seam
            mem.Page(1000)[1] = 5;
            Assert.Contains((1000L, 1L), mem.DataExtents());
        }
        Assert.True(IsOpen(fd, b)); // the caller's descriptor stays open
        var back = new byte[1];
        RandomAccess.Read(handle, back, (1L << 20) + (1000L - 512) * P + 1);
        Assert.Equal(5, back[0]);
    }

    [Fact]
    public void An_owned_descriptor_is_closed_on_dispose_and_holes_cost_nothing()
    {
        string path = ShmFile(64L << 20);
        var handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite);
        int fd = (int)handle.DangerousGetHandle();
        handle.SetHandleAsInvalid(); // the memory owns it now
        using (var mem = GuestMemory.FromDescriptor(fd, 64L << 20, ownsDescriptor: true))
        {
            Assert.Empty(mem.DataExtents());
            using var fresh = GuestMemory.Create(64L << 20);
            Assert.Equal(fresh.ComputeHash(), mem.ComputeHash());
            Assert.Empty(mem.DataExtents()); // hashing touched no hole
        }
        Assert.False(IsOpen(fd, path));
    }

    [Fact]
    public void Bad_files_are_refused_in_one_line_naming_the_path()
    {
        string missing = $"/dev/shm/livemig-test-missing-{Guid.NewGuid():N}";
        var e1 = Assert.Throws<IOException>(() => GuestMemory.Open(missing));
        Assert.StartsWith($"cannot open guest memory file {missing}: ", e1.Message);

        string odd = ShmFile(4L << 20);
        var e2 = Assert.Throws<ArgumentException>(() => GuestMemory.Open(odd, 4097));
        Assert.Equal($"guest memory {odd}: size 4097 is not a positive multiple of 4096 bytes", e2.Message);
        var e3 = Assert.Throws<ArgumentException>(() => GuestMemory.Open(odd, 4096, offset: 100));
        Assert.Contains(odd, e3.Message);

        var e4 = Assert.Throws<IOException>(() => GuestMemory.Open(odd, 8L << 20));
        Assert.Equal($"guest memory {odd} is 4194304 bytes, shorter than the 8388608 bytes asked for (offset 0 + size 8388608)", e4.Message);

        string ragged = ShmFile((1L << 20) + 10);
        var e5 = Assert.Throws<ArgumentException>(() => GuestMemory.Open(ragged));
        Assert.Contains(ragged, e5.Message);

        // A bad second region leaves nothing behind: the first region's file is closed again.
        Assert.Throws<IOException>(() => GuestMemory.Open([GuestMemoryRegion.File(odd, 4L << 20), GuestMemoryRegion.File(missing, 4096)]));
        Assert.DoesNotContain(Directory.GetFiles("/proc/self/fd"), fd => LinkTarget(fd) == odd);
        Assert.DoesNotContain(File.ReadLines("/proc/self/maps"), l => l.EndsWith(odd, StringComparison.Ordinal));
        foreach (var e in new Exception[] { e1, e2, e3, e4, e5 }) Assert.DoesNotContain("\n", e.Message);
    }
}
