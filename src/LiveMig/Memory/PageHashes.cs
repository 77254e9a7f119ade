using System.IO.Hashing;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace LiveMig.Memory;

/// <summary>
/// The verification hash of a guest's memory, kept per page so it can be maintained as pages
/// move instead of recomputed in the downtime: the memory hash is xxHash3-64 over the array of
/// the pages' xxHash3-64 values (little-endian, page order). A page never written hashes as
/// the zero page. <see cref="GuestMemory.ComputeHash"/> computes the same value from scratch.
/// </summary>
public sealed class PageHashes
{
    public static readonly ulong ZeroPageHash = XxHash3.HashToUInt64(new byte[GuestMemory.PageSize]);

    private readonly ulong[] _hashes;

    public PageHashes(long pageCount)
    {
        // Pinned: post-copy's demand pager and its native fault loop write these very values
        // (Pointer), so the switch copies nothing (8 bytes a page of fresh memory was 1–8 ms of downtime).
        _hashes = GC.AllocateUninitializedArray<ulong>(checked((int)pageCount), pinned: true);
        Array.Fill(_hashes, ZeroPageHash);
    }

    /// <summary>The values' fixed address (the array is pinned); valid while this object is reachable.</summary>
    internal unsafe ulong* Pointer => (ulong*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_hashes));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Set(long page, ReadOnlySpan<byte> content) => _hashes[page] = XxHash3.HashToUInt64(content);

    /// <summary>Records a hash already taken of exactly the page's content (the frame check's, for a raw page).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void SetHash(long page, ulong hash) => _hashes[page] = hash;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void SetZero(long page) => _hashes[page] = ZeroPageHash;

    /// <summary>The per-page hashes (post-copy carries them over to its own array at the switch).</summary>
    internal ReadOnlySpan<ulong> Values => _hashes;

    public ulong Combine() => XxHash3.HashToUInt64(MemoryMarshal.AsBytes(_hashes.AsSpan()));
}
