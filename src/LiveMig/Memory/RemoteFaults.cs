namespace LiveMig.Memory;

/// <summary>
/// A userfaultfd that another process — the one whose threads run the VM (QEMU, through the agent
/// preloaded into it) — registered in MISSING mode over its own mapping of the guest memory, and
/// handed to this process (SCM_RIGHTS). The faults are that process's: <see cref="UffdDemandPager"/>
/// serves them from its native loop with <c>UFFDIO_COPY</c> at <see cref="Address"/> (the
/// descriptor carries that process's address space; the page data comes from this one's), and
/// never touches its own mapping of a page that has not arrived (that would fill the shared file
/// with a zero page, which the other process would then read without faulting).
/// </summary>
/// <param name="userfaultfd">This process's copy of the descriptor; the pager that takes it closes it.</param>
/// <param name="address">Where the guest memory starts in the other process.</param>
/// <param name="length">Bytes registered there (the guest memory's size).</param>
/// <param name="ownerGone">How the other process ended, or null while it runs (for a one-line error).</param>
/// <param name="release">Every page arrived: the other process drops its registration and its own copy of the descriptor.</param>
public sealed class RemoteFaults(int userfaultfd, ulong address, long length, Func<string?> ownerGone, Action release)
{
    public int Userfaultfd { get; } = userfaultfd;
    public ulong Address { get; } = address;
    public long Length { get; } = length;

    /// <summary>How the process that runs the VM ended, or null while it runs.</summary>
    public string? OwnerGone() => ownerGone();

    /// <summary>Demand paging is over, every page placed: the owner unregisters the range and closes its copy.</summary>
    public void Release() => release();
}
