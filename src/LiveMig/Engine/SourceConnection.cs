using System.Net.Sockets;
using LiveMig.Transport;

namespace LiveMig.Engine;

/// <summary>The source's way to a destination agent: a TCP connection with the migration's security on top.</summary>
public static class SourceConnection
{
    /// <summary>
    /// Connects (no Nagle: small control frames must not wait) and secures the connection as
    /// <paramref name="options"/> say — the destination's certificate must name
    /// <see cref="MigrationOptions.TlsHostname"/>, or else <paramref name="host"/>; the stream owns the socket.
    /// </summary>
    public static Stream Open(string host, int port, MigrationOptions options)
    {
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            socket.Connect(host, port);
            return options.Security.SecureClient(new NetworkStream(socket, ownsSocket: true), options.TlsHostname ?? host, options.IoTimeout);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }
}
