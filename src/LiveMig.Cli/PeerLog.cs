using LiveMig.Engine;
using LiveMig.Protocol;

namespace LiveMig.Cli;

/// <summary>
/// The lines <c>livemig listen</c> and <c>migrate</c> log about their peers. Whatever a peer named (its VM, its
/// error texts, its certificate) goes through <see cref="PeerText.Escape"/>: one line per
/// event, which no peer can break into two or fill with terminal escapes.
/// </summary>
internal static class PeerLog
{
    public static string Arrived(ArrivedVm a) =>
        $"VM {PeerText.Escape(a.Vm.Name)} arrived ({Units.Bytes(a.Report.MemoryBytes)}, migration {a.Report.MigrationId}, downtime {a.Report.DowntimeMs:0.0} ms, verified {a.Report.Verified?.ToString() ?? "not asked"}) and runs here"
        + (a.Vm is Qemu.QemuVm q && QemuCommands.Forwards(q.Process) is { } forwards ? $"; {forwards}" : "");

    public static string IncomingFailed(MigrationFailedException f) => $"livemig: incoming migration failed: {PeerText.Escape(f.Message)}";

    /// <summary>A migration that failed at the source, whose message may quote the destination.</summary>
    public static string MigrationFailed(Exception e) => $"livemig: migration failed: {PeerText.Escape(e.Message)}";
}
