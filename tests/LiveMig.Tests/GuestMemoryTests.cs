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
