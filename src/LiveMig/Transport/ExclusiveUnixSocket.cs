using System.Net.Sockets;
using LiveMig.Linux;

namespace LiveMig.Transport;

/// <summary>
/// A listening unix socket (a control socket) that nobody else can take over or delete, and
/// that cannot take over anybody's: binding refuses a path something answers on, replaces a
/// stale socket file that nobody answers on, and <see cref="Dispose"/> deletes the file only
/// while it is still the one this bound (same device and inode). Both checks run under an
/// flock on the directory, so two processes starting at once cannot both find the path stale
/// and the second replace the first's fresh socket (processes that bind the path without this
/// class take no part in the lock). Errors are one-line <see cref="IOException"/>s.
/// </summary>
public sealed class ExclusiveUnixSocket : IDisposable
{
    private readonly (ulong Dev, ulong Ino) _identity;
    private bool _disposed;

    private ExclusiveUnixSocket(Socket socket, string path, (ulong, ulong) identity)
    {
        Socket = socket;
        Path = path;
        _identity = identity;
    }

    /// <summary>The listening socket: accept from it; disposing this closes it.</summary>
    public Socket Socket { get; }

    public string Path { get; }

    /// <summary>Binds and listens at <paramref name="path"/> (mode 0600: local, this user only).</summary>
    public static ExclusiveUnixSocket Bind(string path, int backlog = 16)
    {
        path = System.IO.Path.GetFullPath(path);
        string dir = System.IO.Path.GetDirectoryName(path)!;
        // Bound under a name of its own, then renamed into place: .NET deletes the file a socket
        // was bound to when it is disposed, whoever's it is by then, and this way that name is
        // one nobody else uses. The rename also replaces a stale file in one step.
        string scratch = System.IO.Path.Combine(dir, $".{System.IO.Path.GetFileName(path)}.{Guid.NewGuid().ToString("N")[..8]}");
        UnixDomainSocketEndPoint endpoint;
        try { (endpoint, _) = (new UnixDomainSocketEndPoint(scratch), new UnixDomainSocketEndPoint(path)); }
        catch (ArgumentException) { throw new IOException($"{path}: too long for a unix socket path (at most 107 bytes, less for the name it is bound under first)"); }
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            try { socket.Bind(endpoint); }
            catch (SocketException e) { throw new IOException($"{path}: cannot bind a unix socket in {dir}: {e.Message}"); }
            if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(scratch, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            socket.Listen(backlog);
            using (DirectoryLock.Take(dir))
            {
                RefuseTaken(path);
                File.Move(scratch, path, overwrite: true);
                var id = Identity(path) ?? throw new IOException($"{path}: vanished right after it was bound");
                return new ExclusiveUnixSocket(socket, path, (id.Dev, id.Ino));
            }
        }
        catch
        {
            socket.Dispose(); // deletes the scratch name, if it is still there
            throw;
        }
    }

    /// <summary>True when something answers at <paramref name="path"/> (a connection succeeds, or its backlog is full).</summary>
    public static bool IsLive(string path)
    {
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { Blocking = false };
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
            return true;
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.WouldBlock or SocketError.TryAgain or SocketError.InProgress)
        {
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    /// <summary>A path in use is refused: a live socket, or anything that is not a socket. A socket nobody answers on is stale: it may be replaced.</summary>
    private static void RefuseTaken(string path)
    {
        if (Identity(path) is not { } id) return;
        if ((id.Mode & Native.S_IFMT) != Native.S_IFSOCK) throw new IOException($"{path}: exists and is not a socket; refusing to replace it");
        if (IsLive(path)) throw new IOException($"{path}: in use by another running process (a connection to it succeeded); give this one its own path");
    }

    /// <summary>The file's type bits, device and inode (not following a symlink); null when it does not exist.</summary>
    private static unsafe (int Mode, ulong Dev, ulong Ino)? Identity(string path)
    {
        byte* buf = stackalloc byte[Native.StatxSize];
        if (Native.statx(Native.AT_FDCWD, path, Native.AT_SYMLINK_NOFOLLOW, Native.STATX_TYPE | Native.STATX_INO, buf) != 0)
        {
            int errno = Native.Errno;
            if (errno == 2) return null; // ENOENT
            throw new IOException($"{path}: {Native.ErrorText(errno)}");
        }
        int mode = *(ushort*)(buf + Native.StatxModeOffset);
        ulong ino = *(ulong*)(buf + Native.StatxInoOffset);
        ulong dev = ((ulong)*(uint*)(buf + Native.StatxDevMajorOffset) << 32) | *(uint*)(buf + Native.StatxDevMinorOffset);
        return (mode, dev, ino);
    }

    /// <summary>Closes the socket and deletes its file, unless another process's socket has taken the path since.</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Socket.Dispose();
        try
        {
            using var dirLock = DirectoryLock.Take(System.IO.Path.GetDirectoryName(Path)!);
            if (Identity(Path) is { } now && (now.Dev, now.Ino) == _identity) File.Delete(Path);
        }
        catch (IOException) { } // the directory went away: nothing of ours is left to delete
    }

    /// <summary>An exclusive flock on a directory for a check-then-act on one of its entries.</summary>
    private sealed class DirectoryLock : IDisposable
    {
        private readonly int _fd;

        private DirectoryLock(int fd) => _fd = fd;

        public static DirectoryLock Take(string directory)
        {
            int fd = Native.open(directory, Native.O_RDONLY | Native.O_DIRECTORY | Native.O_CLOEXEC);
            if (fd < 0) throw new IOException($"{directory}: {Native.ErrorText(Native.Errno)}");
            if (Native.flock(fd, Native.LOCK_EX) != 0)
            {
                int errno = Native.Errno;
                Native.close(fd);
                throw new IOException($"{directory}: cannot lock: {Native.ErrorText(errno)}");
            }
            return new DirectoryLock(fd);
        }

        public void Dispose() => Native.close(_fd); // closing releases the lock
    }
}
