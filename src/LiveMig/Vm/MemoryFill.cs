using LiveMig.Memory;
using LiveMig.Workloads;

namespace LiveMig.Vm;

/// <summary>Initial guest memory content, standing in for what an OS and its applications leave in RAM.</summary>
public enum MemoryFill
{
    /// <summary>Nothing written: all pages are holes (zero).</summary>
    Zero,
    /// <summary>Every page random: incompressible, the worst case for the link.</summary>
    Random,
    /// <summary>Per page, by a seeded draw: 35% zero, 25% random, 40% text-like (compressible).</summary>
    Mixed,
}

public static class MemoryFiller
{
    public static void Fill(GuestMemory memory, MemoryFill fill, ulong seed)
    {
        if (fill == MemoryFill.Zero) return;
        const long Chunk = 1024; // pages per parallel work item
        long chunks = (memory.PageCount + Chunk - 1) / Chunk;
        Parallel.For(0L, chunks, c =>
        {
            long first = c * Chunk, end = Math.Min(memory.PageCount, first + Chunk);
            var rng = new Xoshiro256(seed ^ (ulong)c * 0x9E3779B97F4A7C15UL);
            for (long p = first; p < end; p++)
            {
                int kind = fill == MemoryFill.Random ? 1 : (int)(rng.Next() % 100) switch { < 35 => 0, < 60 => 1, _ => 2 };
                if (kind == 0) continue;
                Span<byte> page = memory.Page(p);
                if (kind == 1) FillRandom(page, ref rng);
                else FillText(page, ref rng);
                memory.NoteWrite(p);
            }
        });
    }

    private static void FillRandom(Span<byte> page, ref Xoshiro256 rng)
    {
        Span<ulong> words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(page);
        for (int i = 0; i < words.Length; i++) words[i] = rng.Next();
    }

    private static ReadOnlySpan<byte> Words => "the of and to in is for that with on as by this from at memory page guest vcpu kernel migration dirty round copy send "u8;

    private static void FillText(Span<byte> page, ref Xoshiro256 rng)
    {
        // Words drawn from a small vocabulary: compresses about like program text and logs.
        ReadOnlySpan<byte> vocab = Words;
        int i = 0;
        while (i < page.Length)
        {
            int start = (int)rng.NextBelow(vocab.Length - 12);
            int len = 4 + (int)rng.NextBelow(8);
            for (int k = 0; k < len && i < page.Length; k++) page[i++] = vocab[start + k];
        }
    }
}
