using System.Net.Sockets;
using LiveMig.Transport;

namespace LiveMig.Tests;

/// <summary>Control sockets that cannot be hijacked (issue 10, item 6): a live path is refused, a stale one replaced, only one's own file deleted.</summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public class ExclusiveUnixSocketTests
{
    private static string NewPath() => Path.Combine(Path.GetTempPath(), $"lm-x-{Guid.NewGuid():N}.sock");

    [Fact]
    public void A_path_another_process_answers_on_is_refused_and_left_alone()
    {
        string path = NewPath();
        using var first = ExclusiveUnixSocket.Bind(path);
        var e = Assert.Throws<IOException>(() => ExclusiveUnixSocket.Bind(path));
        Assert.Contains("in use by another running process", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        Assert.True(File.Exists(path));
        Assert.True(ExclusiveUnixSocket.IsLive(path));
        first.Dispose();
        Assert.False(File.Exists(path));
    }

    [Fact]
    public void A_stale_socket_file_nobody_answers_on_is_replaced()
    {
        string path = NewPath();
        // A process that died and left its file: bound elsewhere and moved into place, since .NET
        // deletes the file a socket was bound to when the socket is disposed.
        string elsewhere = NewPath();
        using (var dead = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            dead.Bind(new UnixDomainSocketEndPoint(elsewhere));
            File.Move(elsewhere, path);
        }
        Assert.True(File.Exists(path));
        Assert.False(ExclusiveUnixSocket.IsLive(path));
        using var s = ExclusiveUnixSocket.Bind(path);
        Assert.True(ExclusiveUnixSocket.IsLive(path));
    }

    [Fact]
    public void Disposing_deletes_only_the_socket_file_it_bound()
    {
        string path = NewPath();
        var first = ExclusiveUnixSocket.Bind(path);
        File.Delete(path); // someone removed it by hand and another process bound the path anew
        using var second = ExclusiveUnixSocket.Bind(path);
        first.Dispose();
        Assert.True(File.Exists(path), "the first socket deleted the second's file");
        Assert.True(ExclusiveUnixSocket.IsLive(path));
    }

    [Fact]
    public void A_path_that_is_not_a_socket_is_not_replaced()
    {
        string path = NewPath();
        File.WriteAllText(path, "important");
        try
        {
            var e = Assert.Throws<IOException>(() => ExclusiveUnixSocket.Bind(path));
            Assert.Contains("is not a socket", e.Message);
            Assert.Equal("important", File.ReadAllText(path));
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void The_socket_is_for_this_user_only()
    {
        string path = NewPath();
        using var s = ExclusiveUnixSocket.Bind(path);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(path));
    }
}
