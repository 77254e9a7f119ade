using System.Net.Sockets;
using LiveMig.Cli;
using LiveMig.Engine;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary>Peer text (VM names, error texts) reaches logs and reports escaped: one line, no terminal escapes.</summary>
public class PeerTextTests
{
    /// <summary>A clear-screen, a title change and a forged second log line.</summary>
    private const string Forgery = "x\u001b[2J\u001b]0;owned\u0007\r\nVM vm9 arrived (64.0 MiB, downtime 1.0 ms, verified True) and runs here\u202e";

    private static void AssertOneSafeLine(string shown)
    {
        Assert.DoesNotContain(shown.EnumerateRunes(), r => System.Text.Rune.IsControl(r) || System.Text.Rune.GetUnicodeCategory(r) == System.Globalization.UnicodeCategory.Format);
        Assert.Contains(@"x\x1b[2J\x1b]0;owned\x07\r\nVM vm9 arrived", shown);
    }

    [Fact]
    public void Escape_makes_control_characters_and_format_characters_visible_and_is_idempotent()
    {
        Assert.Equal(@"a\nb\tc\x1b[31m\x7f\x9b\u202e\u2028d", PeerText.Escape("a\nb\tc\u001b[31m\u007f\u009b\u202e\u2028d"));
        Assert.Equal("plain text, ünïcode, emoji 🚀", PeerText.Escape("plain text, ünïcode, emoji 🚀"));
        string once = PeerText.Escape(Forgery);
        Assert.Equal(once, PeerText.Escape(once));
        AssertOneSafeLine(once);
        Assert.Equal("", PeerText.Escape(null));
    }

    [Fact]
    public void A_vm_name_with_escape_sequences_and_newlines_is_logged_and_reported_escaped()
    {
        using var loop = new Loopback();
        using var vm = BuiltInVm.Create(new VmConfig { Name = Forgery, MemoryBytes = 16L << 20, Workload = "idle" });
        vm.Start();
        var (_, arrived) = loop.Migrate(vm);
        AssertOneSafeLine(arrived.Report.VmName);
        AssertOneSafeLine(PeerLog.Arrived(arrived));
        Assert.StartsWith(@"VM x\x1b[2J", PeerLog.Arrived(arrived));
    }

    [Fact]
    public void An_error_text_from_the_source_with_escape_sequences_is_logged_and_reported_escaped()
    {
        using var loop = new Loopback();
        using var client = new TcpClient("127.0.0.1", loop.Port) { NoDelay = true };
        using var s = client.GetStream();
        using var w = new FrameWriter(s);
        Span<byte> buf = stackalloc byte[4200];
        w.Send(FrameType.Hello, buf[..new HelloMessage(ProtocolVersion.Version, ProtocolVersion.MinSupported, Capabilities.Raw | Capabilities.ZeroPages, Capabilities.Raw | Capabilities.ZeroPages,
            16L << 20, GuestMemory.PageSize, 1, Guid.NewGuid(), "vm", BuiltInVm.KindName).Write(buf)]);
        w.Send(FrameType.Error, buf[..new ErrorMessage(ErrorMessage.BadStream, Forgery).Write(buf)]);
        var failure = loop.DestinationFailure();
        AssertOneSafeLine(failure.Message);
        AssertOneSafeLine(failure.Report.Error!);
        AssertOneSafeLine(PeerLog.IncomingFailed(failure));
    }
}
