using System.Net.Sockets;
using LiveMig.Protocol;

namespace LiveMig.Transport;

/// <summary>
/// The one definition of "the network failed us", used by every engine on both sides: a closed,
/// reset or silent connection, or a frame that arrived damaged (checksum mismatch, cut short).
/// After one of these a resumable migration reconnects. A peer that breaks the protocol — a
/// malformed, unexpected or hostile frame — is never a link failure: the migration fails.
/// </summary>
public static class LinkFailure
{
    public static bool Is(Exception e) =>
        e is IOException or SocketException or ObjectDisposedException or TimeoutException or ProtocolException { LinkFailure: true };

    /// <summary>
    /// Why a connection failed, in one line, as the kernel said it (reset, refused, unreachable,
    /// timed out) rather than .NET's wrapper text. A socket's own read timeout also surfaces as
    /// ETIMEDOUT: with <paramref name="readTimeout"/> (the failure was a read on a socket with that
    /// timeout) it is said as what it is — the peer sent nothing for that long.
    /// </summary>
    public static string Describe(Exception e, TimeSpan? readTimeout = null)
    {
        var socket = Find(e);
        if (socket is null) return (e.InnerException is IOException inner ? inner.Message : e.Message).ReplaceLineEndings(" ");
        return socket.SocketErrorCode switch
        {
            SocketError.ConnectionReset => "connection reset by the peer (ECONNRESET: its process ended or it aborted the connection)",
            SocketError.ConnectionRefused => "connection refused (ECONNREFUSED: nothing listens on that address and port)",
            SocketError.TimedOut when readTimeout is { } t => $"read timed out: nothing received for {t.TotalSeconds:0.###} s (the peer, or the network between, is down or stalled)",
            SocketError.TimedOut => "connection timed out (ETIMEDOUT: the peer stopped acknowledging)",
            SocketError.HostUnreachable => "host unreachable (EHOSTUNREACH)",
            SocketError.NetworkUnreachable => "network unreachable (ENETUNREACH)",
            SocketError.NetworkDown => "network down (ENETDOWN)",
            SocketError.ConnectionAborted => "connection aborted (ECONNABORTED)",
            SocketError.Shutdown => "connection already shut down (EPIPE: the peer closed it)",
            SocketError.HostNotFound => $"host not found ({socket.Message})",
            _ => socket.Message.ReplaceLineEndings(" "),
        };
    }

    private static SocketException? Find(Exception? e)
    {
        for (; e is not null; e = e.InnerException)
            if (e is SocketException s) return s;
        return null;
    }
}
