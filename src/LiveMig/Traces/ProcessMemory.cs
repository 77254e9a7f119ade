using System.Globalization;
using System.Runtime.InteropServices;

namespace LiveMig.Traces;

/// <summary>One line of /proc/PID/maps that the recorder reads: a writable mapping.</summary>
public readonly record struct Mapping(ulong Start, ulong End, bool Shared, ulong Offset, ulong Device, ulong Inode, string Name)
{
    public long Pages => (long)((End - Start) / PageClasses.PageSize);
}

/// <summary>The target went away while it was being read.</summary>
public sealed class TargetExitedException(int pid) : Exception($"process {pid} exited")
{
    public int Pid { get; } = pid;
}

/// <summary>
/// Reads another process's memory from outside it: its writable mappings (/proc/PID/maps),
/// which of their pages are present or swapped (/proc/PID/pagemap), and their bytes
/// (process_vm_readv). Needs ptrace read access to the target (root, or the same user with
/// kernel.yama.ptrace_scope permitting it).
/// </summary>
internal static unsafe partial class ProcessMemory
{
    internal const int ESRCH = 3;
    private const int EPERM = 1, EFAULT = 14, EIO = 5;

    [StructLayout(LayoutKind.Sequential)]
    private struct IoVec { public nint Base; public nuint Length; }

    [LibraryImport("libc", SetLastError = true)]
    private static partial nint process_vm_readv(int pid, IoVec* local, ulong liovcnt, IoVec* remote, ulong riovcnt, ulong flags);

    /// <summary>The writable mappings of <paramref name="pid"/>, in address order.</summary>
    public static List<Mapping> WritableMappings(int pid)
    {
        string[] lines;
        try { lines = File.ReadAllLines($"/proc/{pid}/maps"); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { throw new TargetExitedException(pid); }
        catch (UnauthorizedAccessException) { throw NoPermission(pid); }
        catch (IOException e) when (e.HResult == ESRCH || !Directory.Exists($"/proc/{pid}")) { throw new TargetExitedException(pid); }
        var list = new List<Mapping>();
        foreach (string line in lines)
            if (ParseMapsLine(line) is { } m) list.Add(m);
        return list;
    }

    /// <summary>A maps line as a writable mapping worth reading, or null (read-only, or a special area such as [vvar]).</summary>
    internal static Mapping? ParseMapsLine(string line)
    {
        // 7f2c...-7f2d... rw-p 00000000 08:01 1234   /path (deleted)
        string[] f = line.Split(' ', 6, StringSplitOptions.RemoveEmptyEntries);
        if (f.Length < 5 || f[1].Length < 4 || f[1][1] != 'w' || f[1][0] != 'r') return null;
        int dash = f[0].IndexOf('-');
        if (dash < 0) return null;
        ulong start = ulong.Parse(f[0].AsSpan(0, dash), NumberStyles.HexNumber), end = ulong.Parse(f[0].AsSpan(dash + 1), NumberStyles.HexNumber);
        string name = f.Length > 5 ? f[5].Trim() : "";
        // Device memory and the kernel's own areas are not the program's data, and reading them can fail or have effects.
        // (/dev/zero is how anonymous shared memory shows, e.g. PostgreSQL's buffers.)
        if (name.StartsWith("/dev/", StringComparison.Ordinal) && !name.StartsWith("/dev/shm/", StringComparison.Ordinal) && !name.StartsWith("/dev/zero", StringComparison.Ordinal)) return null;
        if (name is "[vvar]" or "[vsyscall]" or "[vdso]" or "[vvar_vclock]") return null;
        int colon = f[3].IndexOf(':');
        ulong dev = colon < 0 ? 0 : (ulong.Parse(f[3].AsSpan(0, colon), NumberStyles.HexNumber) << 32) | ulong.Parse(f[3].AsSpan(colon + 1), NumberStyles.HexNumber);
        return new Mapping(start, end, f[1][3] == 's', ulong.Parse(f[2], NumberStyles.HexNumber), dev, ulong.Parse(f[4], CultureInfo.InvariantCulture), name);
    }

    /// <summary>Which pages of [start, start + pages) are present or swapped out (pagemap bits 63 and 62).</summary>
    public static void ResidentPages(Microsoft.Win32.SafeHandles.SafeFileHandle pagemap, ulong start, long pages, Span<bool> into, byte[] scratch)
    {
        long done = 0;
        while (done < pages)
        {
            int n = (int)Math.Min(pages - done, scratch.Length / 8);
            int got = RandomAccess.Read(pagemap, scratch.AsSpan(0, n * 8), (long)(start / PageClasses.PageSize + (ulong)done) * 8);
            int entries = got / 8;
            for (int i = 0; i < entries; i++)
                into[(int)done + i] = (BitConverter.ToUInt64(scratch, i * 8) & (3UL << 62)) != 0;
            for (int i = entries; i < n; i++) into[(int)done + i] = false; // past the end (the mapping shrank)
            done += n;
            if (got == 0) break;
        }
    }

    /// <summary>
    /// Reads <paramref name="into"/>.Length bytes at <paramref name="address"/> of the target;
    /// returns how many it could read (less when part of the range was unmapped meanwhile).
    /// </summary>
    public static long Read(int pid, ulong address, Span<byte> into)
    {
        fixed (byte* p = into)
        {
            var local = new IoVec { Base = (nint)p, Length = (nuint)into.Length };
            var remote = new IoVec { Base = (nint)address, Length = (nuint)into.Length };
            long n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
            if (n >= 0) return n;
            int errno = Marshal.GetLastPInvokeError();
            return errno switch
            {
                ESRCH => throw new TargetExitedException(pid),
                EPERM => throw NoPermission(pid),
                EFAULT or EIO => 0, // unmapped since maps was read, or not readable: nothing there to trace
                _ => throw new IOException($"process_vm_readv of process {pid} failed: errno {errno}"),
            };
        }
    }

    public static UnauthorizedAccessException NoPermission(int pid) =>
        new($"no permission to read the memory of process {pid} (needs ptrace access: run as root or as its user, and check kernel.yama.ptrace_scope)");

    /// <summary>Processes whose parent is <paramref name="pid"/>, and theirs, from /proc/*/stat.</summary>
    public static List<int> Descendants(int pid)
    {
        var parent = new Dictionary<int, int>();
        foreach (string dir in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int p)) continue;
            try
            {
                string stat = File.ReadAllText(Path.Combine(dir, "stat"));
                int close = stat.LastIndexOf(')'); // the name may hold spaces and parentheses
                string[] f = stat[(close + 2)..].Split(' ');
                if (f.Length > 1 && int.TryParse(f[1], out int pp)) parent[p] = pp;
            }
            catch (IOException) { } // it exited meanwhile
            catch (UnauthorizedAccessException) { }
        }
        var result = new List<int>();
        var frontier = new Queue<int>([pid]);
        while (frontier.Count > 0)
        {
            int q = frontier.Dequeue();
            foreach (var (child, pp) in parent)
                if (pp == q) { result.Add(child); frontier.Enqueue(child); }
        }
        return result;
    }
}
