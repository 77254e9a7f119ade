namespace LiveMig.Memory;

/// <summary>
/// One piece of guest memory backed by an existing file: a path to open (e.g. QEMU's
/// <c>memory-backend-file</c> under /dev/shm) or a descriptor (e.g. one passed over a Unix
/// socket), <see cref="Size"/> bytes from <see cref="Offset"/> in it, both page multiples.
/// </summary>
public sealed record GuestMemoryRegion
{
    /// <summary>The file to open read-write; null when <see cref="Descriptor"/> is given instead.</summary>
    public string? Path { get; init; }
    /// <summary>An open descriptor of the file (-1 when <see cref="Path"/> is given).</summary>
    public int Descriptor { get; init; } = -1;
    /// <summary>Whether the memory closes <see cref="Descriptor"/> when disposed (a file opened by path is always closed).</summary>
    public bool OwnsDescriptor { get; init; }
    /// <summary>Where the region starts in the file.</summary>
    public long Offset { get; init; }
    /// <summary>Bytes of the file to map; -1 = the rest of the file from <see cref="Offset"/>.</summary>
    public required long Size { get; init; }

    public static GuestMemoryRegion File(string path, long size, long offset = 0) => new() { Path = path, Size = size, Offset = offset };

    public static GuestMemoryRegion FromDescriptor(int fd, long size, bool ownsDescriptor, long offset = 0) =>
        new() { Descriptor = fd, Size = size, OwnsDescriptor = ownsDescriptor, Offset = offset };

    /// <summary>How errors name it: the path, or the descriptor.</summary>
    public string What => Path ?? $"descriptor {Descriptor}";
}
