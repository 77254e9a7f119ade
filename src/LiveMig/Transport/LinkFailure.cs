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
}
