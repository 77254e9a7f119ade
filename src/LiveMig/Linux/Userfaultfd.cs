using System.Runtime.InteropServices;

namespace LiveMig.Linux;

/// <summary>userfaultfd and PAGEMAP_SCAN ABI (include/uapi/linux/userfaultfd.h, fs.h), x86_64.</summary>
internal static class Userfaultfd
{
    public const ulong UFFD_API = 0xAA;
    public const int UFFD_USER_MODE_ONLY = 1;

    public const ulong UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1UL << 12;
    public const ulong UFFD_FEATURE_WP_UNPOPULATED = 1UL << 13;
    public const ulong UFFD_FEATURE_WP_ASYNC = 1UL << 15;

    public const ulong UFFDIO_REGISTER_MODE_MISSING = 1, UFFDIO_REGISTER_MODE_WP = 2;
    public const ulong UFFDIO_WRITEPROTECT_MODE_WP = 1;

    // _IOWR/_IOR(0xAA, nr, struct): dir<<30 | size<<16 | type<<8 | nr
    public const ulong UFFDIO_API = 0xC018AA3F;
    public const ulong UFFDIO_REGISTER = 0xC020AA00;
    public const ulong UFFDIO_UNREGISTER = 0x8010AA01;
    public const ulong UFFDIO_WRITEPROTECT = 0xC018AA06;

    // _IOWR('f', 16, struct pm_scan_arg) on /proc/self/pagemap
    public const ulong PAGEMAP_SCAN = 0xC0606610;
    public const ulong PM_SCAN_WP_MATCHING = 1, PM_SCAN_CHECK_WPASYNC = 2;
    public const ulong PAGE_IS_WRITTEN = 1UL << 1;

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioApi { public ulong Api, Features, Ioctls; }

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioRange { public ulong Start, Len; }

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioRegister { public UffdioRange Range; public ulong Mode, Ioctls; }

    [StructLayout(LayoutKind.Sequential)]
    public struct UffdioWriteProtect { public UffdioRange Range; public ulong Mode; }

    [StructLayout(LayoutKind.Sequential)]
    public struct PmScanArg
    {
        public ulong Size, Flags, Start, End, WalkEnd, Vec, VecLen, MaxPages;
        public ulong CategoryInverted, CategoryMask, CategoryAnyofMask, ReturnMask;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct PageRegion { public ulong Start, End, Categories; }
}
