using LiveMig.Memory;
using LiveMig.Workloads;

namespace LiveMig.Tests;

/// <summary>
/// <see cref="PageBitmap.Compact"/>: the simulator's page sets hold no words while uniform. Every
/// operation must give exactly what a plain bitmap gives, whichever states (clear, set, words) the
/// operands are in; a seeded random sequence of operations on compact and plain twins checks it.
/// </summary>
public sealed class CompactPageBitmapTests
{
    [Fact]
    public void UniformStatesHoldNoWords()
    {
        var b = PageBitmap.Compact(1000);
        Assert.Equal(false, b.Uniform);
        Assert.Equal(0, b.Count());
        b.SetRange(0, 1000);
        Assert.Equal(true, b.Uniform);
        Assert.Equal(1000, b.Count());
        Assert.Equal((1UL << (1000 & 63)) - 1, b.Word(b.WordCount - 1));
        var other = PageBitmap.Compact(1000);
        other.CopyFrom(b);
        Assert.Equal(1000, b.AndNot(other));
        Assert.Equal(false, b.Uniform);
        Assert.Equal(true, other.Uniform);
        Assert.Equal(-1, b.NextSet(0));
        Assert.Equal(5, other.NextSet(5));
    }

    [Fact]
    public void EveryOperationMatchesAPlainBitmap()
    {
        const long pages = 1000; // not a multiple of 64: the tail word matters
        var rng = new Xoshiro256(42);
        var compact = Enumerable.Range(0, 3).Select(_ => PageBitmap.Compact(pages)).ToArray();
        var plain = Enumerable.Range(0, 3).Select(_ => new PageBitmap(pages)).ToArray();
        for (int step = 0; step < 5000; step++)
        {
            int i = (int)(rng.Next() % 3), j = (int)(rng.Next() % 3);
            long p = (long)(rng.Next() % pages);
            switch (rng.Next() % 10)
            {
                case 0: compact[i].ClearAll(); plain[i].ClearAll(); break;
                case 1: compact[i].SetAll(); plain[i].SetAll(); break;
                case 2: compact[i].SetRange(0, pages); plain[i].SetRange(0, pages); break;
                case 3: compact[i].SetRange(p, Math.Min(70, pages - p)); plain[i].SetRange(p, Math.Min(70, pages - p)); break;
                case 4: compact[i].Set(p); plain[i].Set(p); break;
                case 5: compact[i].Clear(p); plain[i].Clear(p); break;
                case 6: if (i != j) { compact[i].Or(compact[j]); plain[i].Or(plain[j]); } break;
                case 7: if (i != j) Assert.Equal(plain[i].AndNot(plain[j]), compact[i].AndNot(compact[j])); break;
                case 8: if (i != j) { compact[i].CopyFrom(compact[j]); plain[i].CopyFrom(plain[j]); } break;
                case 9: if (i != j) Assert.Equal(plain[i].HarvestInto(plain[j]), compact[i].HarvestInto(compact[j])); break;
            }
            for (int k = 0; k < 3; k++)
            {
                Assert.Equal(plain[k].Count(), compact[k].Count());
                Assert.Equal(plain[k].NextSet(p), compact[k].NextSet(p));
                Assert.Equal(plain[k].IsSet(p), compact[k].IsSet(p));
                Assert.Equal(plain[k].Word(p >> 6), compact[k].Word(p >> 6));
            }
        }
        for (int k = 0; k < 3; k++) Assert.Equal(plain[k].Runs(), compact[k].Runs());
    }

    [Fact]
    public void Count_and_AndNot_count_every_bit_whatever_the_word_path()
    {
        // 8,195 pages: vectors of eight words, then single words, then a partial word.
        const long pages = 8195;
        var rng = new Xoshiro256(3);
        var a = new PageBitmap(pages);
        var b = new PageBitmap(pages);
        for (long p = 0; p < pages; p++)
        {
            if (rng.Next() % 3 == 0) a.Set(p);
            if (rng.Next() % 2 == 0) b.Set(p);
        }
        long both = 0, inA = 0;
        for (long p = 0; p < pages; p++)
        {
            if (a.IsSet(p)) inA++;
            if (a.IsSet(p) && b.IsSet(p)) both++;
        }
        Assert.Equal(inA, a.Count());
        Assert.Equal(both, a.AndNot(b));
        Assert.Equal(inA - both, a.Count());
        for (long p = 0; p < pages; p++) Assert.False(a.IsSet(p) && b.IsSet(p));
    }
}
