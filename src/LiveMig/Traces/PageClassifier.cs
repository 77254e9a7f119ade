using System.Numerics;
using System.Runtime.Intrinsics;
using K4os.Compression.LZ4;

namespace LiveMig.Traces;

/// <summary>The content model of one page's bytes: the same measure the recorder applies and the replay aims at.</summary>
public static class PageClassifier
{
    [ThreadStatic] private static byte[]? _scratch;

    public static bool IsZero(ReadOnlySpan<byte> page) => page.IndexOfAnyExcept((byte)0) < 0;

    /// <summary>Zero, or a compressibility class by LZ4 (fast) size; never <see cref="PageContent.Duplicate"/>.</summary>
    public static PageContent Classify(ReadOnlySpan<byte> page)
    {
        if (IsZero(page)) return PageContent.Zero;
        var dst = _scratch ??= new byte[PageClasses.PageSize];
        // Room for 7/8 of a page: anything larger is incompressible for the pipeline anyway.
        int n = LZ4Codec.Encode(page, dst.AsSpan(0, PageClasses.PageSize * 7 / 8), LZ4Level.L00_FAST);
        return PageClasses.FromCompressedSize(n > 0 ? n : -1);
    }

    /// <summary>How many bytes differ between two pages.</summary>
    public static int BytesChanged(ReadOnlySpan<byte> before, ReadOnlySpan<byte> after)
    {
        int same = 0, i = 0;
        for (; i + 32 <= before.Length; i += 32)
        {
            var eq = Vector256.Equals(Vector256.Create(before.Slice(i, 32)), Vector256.Create(after.Slice(i, 32)));
            same += BitOperations.PopCount(eq.ExtractMostSignificantBits());
        }
        for (; i < before.Length; i++) if (before[i] == after[i]) same++;
        return before.Length - same;
    }

    public static int NonZeroBytes(ReadOnlySpan<byte> page)
    {
        int zero = 0, i = 0;
        for (; i + 32 <= page.Length; i += 32)
            zero += BitOperations.PopCount(Vector256.Equals(Vector256.Create(page.Slice(i, 32)), Vector256<byte>.Zero).ExtractMostSignificantBits());
        for (; i < page.Length; i++) if (page[i] == 0) zero++;
        return page.Length - zero;
    }
}
