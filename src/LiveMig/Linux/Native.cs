using System.Runtime.InteropServices;

namespace LiveMig.Linux;

/// <summary>
/// Every libc entry point LiveMig uses, in one place. Linux x86_64 only; callers
/// check <see cref="OperatingSystem.IsLinux"/> before touching any of these.
/// </summary>
internal static unsafe partial class Native
{
    private const string Libc = "libc";

    public const int PROT_NONE = 0x0, PROT_READ = 0x1, PROT_WRITE = 0x2;
    public const int MAP_SHARED = 0x01, MAP_PRIVATE = 0x02, MAP_FIXED = 0x10, MAP_ANONYMOUS = 0x20, MAP_NORESERVE = 0x4000;
    public const int MFD_CLOEXEC = 0x1;
    public const int MADV_DONTNEED = 4, MADV_REMOVE = 9, MADV_POPULATE_WRITE = 23;
    public const int SEEK_DATA = 3, SEEK_HOLE = 4;
    public const int O_RDWR = 0x2, O_RDONLY = 0x0, O_CLOEXEC = 0x80000, O_NONBLOCK = 0x800;
    public const int FALLOC_FL_KEEP_SIZE = 0x1, FALLOC_FL_PUNCH_HOLE = 0x2;
    public const int ENXIO = 6, EINTR = 4, EAGAIN = 11, EEXIST = 17;
    public const long SYS_userfaultfd = 323, SYS_gettid = 186;

    public static readonly nint MAP_FAILED = -1;

    [LibraryImport(Libc, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int memfd_create(string name, uint flags);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int ftruncate(int fd, long length);

    /// <summary>The canonical absolute path (symbolic links, "." and ".." resolved); malloc'ed: <see cref="free"/> it. 0 on error.</summary>
    [LibraryImport(Libc, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nint realpath(string path, nint resolved);

    [LibraryImport(Libc)]
    public static partial void free(nint p);

    /// <summary>The canonical path of an existing file or directory, or null (and errno) when it cannot be resolved.</summary>
    public static string? RealPath(string path)
    {
        nint p = realpath(path, 0);
        if (p == 0) return null;
        try { return Marshal.PtrToStringUTF8(p); }
        finally { free(p); }
    }

    [LibraryImport(Libc, SetLastError = true)]
    public static partial nint mmap(nint addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int munmap(nint addr, nuint length);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int madvise(nint addr, nuint length, int advice);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial long lseek(int fd, long offset, int whence);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int fallocate(int fd, int mode, long offset, long len);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int close(int fd);

    [LibraryImport(Libc, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int open(string path, int flags);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int ioctl(int fd, ulong request, void* arg);

    [LibraryImport(Libc, SetLastError = true)]
    public static partial long syscall(long number, long arg0);

    [LibraryImport(Libc, SetLastError = true)]
    private static partial int setpriority(int which, int who, int prio);

    /// <summary>
    /// Gives the calling thread a higher scheduling weight (nice <paramref name="nice"/>): for the
    /// threads a faulting vCPU waits on (post-copy's request server, the native fault thread), so
    /// the push, the placing and the guest's own threads do not delay a fault on a busy machine.
    /// Needs root or CAP_SYS_NICE; false (nothing changed) elsewhere.
    /// </summary>
    public static bool RaiseCurrentThread(int nice = -10)
    {
        if (!OperatingSystem.IsLinux()) return false;
        int tid = (int)syscall(SYS_gettid, 0);
        return tid > 0 && setpriority(0 /* PRIO_PROCESS: a thread id names the thread */, tid, nice) == 0;
    }

    public const int O_DIRECTORY = 0x10000, LOCK_EX = 2, LOCK_UN = 8;
    public const int AT_FDCWD = -100, AT_SYMLINK_NOFOLLOW = 0x100;
    public const uint STATX_TYPE = 0x1, STATX_INO = 0x100;
    public const int S_IFMT = 0xF000, S_IFSOCK = 0xC000;

    [LibraryImport(Libc, SetLastError = true)]
    public static partial int flock(int fd, int operation);

    /// <summary>struct statx is the same on every architecture (unlike struct stat): 256 bytes, the fields read at fixed offsets.</summary>
    [LibraryImport(Libc, SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int statx(int dirfd, string path, int flags, uint mask, byte* statxbuf);

    public const int StatxSize = 256, StatxModeOffset = 28, StatxInoOffset = 32, StatxDevMajorOffset = 136, StatxDevMinorOffset = 140;

    // recvmsg with one descriptor passed as SCM_RIGHTS (the QEMU agent's userfaultfd, Qemu/QemuAgentFaults.cs).
    public const int SOL_SOCKET = 1, SCM_RIGHTS = 1, MSG_CMSG_CLOEXEC = 0x40000000;

    [StructLayout(LayoutKind.Sequential)]
    public struct IoVec { public void* Base; public nuint Length; }

    /// <summary>struct msghdr (x86_64; the layout inserts the padding after NameLength and Flags).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct MsgHdr
    {
        public void* Name;
        public uint NameLength;
        public IoVec* Iov;
        public nuint IovLength;
        public void* Control;
        public nuint ControlLength;
        public int Flags;
    }

    /// <summary>struct cmsghdr carrying one int: CMSG_SPACE(sizeof(int)) = 24 bytes on x86_64, the descriptor at offset 16.</summary>
    public const int CmsgOneFdSpace = 24, CmsgHeaderLength = 16;

    [LibraryImport(Libc, SetLastError = true)]
    public static partial nint recvmsg(int fd, MsgHdr* msg, int flags);

    public static int Errno => Marshal.GetLastPInvokeError();

    public static string ErrorText(int errno) => Marshal.GetPInvokeErrorMessage(errno) + $" (errno {errno})";
}
