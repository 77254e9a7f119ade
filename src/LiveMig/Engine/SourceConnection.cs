using System.Net.Sockets;
using LiveMig.Transport;

namespace LiveMig.Engine;

/// <summary>The source's way to a destination agent: a TCP connection with the migration's security on top.</summary>
public static class SourceConnection
{
    /// <summary>Connects (no Nagle: small control frames must not wait) and secures the connection; the stream owns the socket.</summary>
    public static Stream Open(string host, int port, ChannelSecurity security, TimeSpan ioTimeout)
    {
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            socket.Connect(host, port);
            return security.SecureClient(new NetworkStream(socket, ownsSocket: true), host, ioTimeout);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }
}
