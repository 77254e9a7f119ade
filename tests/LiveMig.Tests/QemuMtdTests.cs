using LiveMig.Engine;
using LiveMig.Mtd;
using LiveMig.Policies;
using LiveMig.Vm;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// Moving target defence with a real QEMU guest (issue 16): the boot-sector guest kept moving
/// between three agents, each move verified, the guest's own check reporting on every
/// destination that it lost no page and goes on from where it was.
/// </summary>
[Trait("Category", "Qemu")]
public class QemuMtdTests(ITestOutputHelper output)
{
    [SkippableFact]
    public void The_boot_sector_guest_keeps_moving_between_three_agents_and_checks_itself_after_every_move()
    {
        string image = QemuGuest.Image(24);
        string dir = QemuGuest.ImageDirectory();
        var options = new LiveMtdOptions
        {
            Vm = new VmConfig { Name = "mtd-qemu-" + Guid.NewGuid().ToString("N")[..6] },
            Qemu = QemuGuest.Spec(image, 64),
            QemuHost = QemuGuest.Host(dir),
            // The guest rewrites its range faster than any round sends it: a few rounds, then the pause.
            Migration = new MigrationOptions { PreCopy = new PreCopyOptions { MaxRounds = 3, OnStall = StallAction.Pause, MaxDowntime = TimeSpan.FromSeconds(30) } },
            Interval = TimeSpan.Zero,
            Moves = 20,
        };
        using var mtd = new LiveMtd(options);
        var result = mtd.Run(m => output.WriteLine($"{m.Index}: {m.From} → {m.To} {m.TotalMs:0} ms, downtime {m.DowntimeMs:0.0} ms, verified {m.Verified}, guest passes {m.GuestPasses}, errors {m.GuestErrors}{(m.Error is null ? "" : " " + m.Error)}"));
        output.WriteLine($"guest: {result.Guest}; checks: {result.Checks}");

        Assert.Null(result.Stopped);
        Assert.Equal(20, result.Completed);
        Assert.All(result.Moves, m => Assert.True(m.Verified, $"move {m.Index} not verified"));
        Assert.All(result.Moves, m => Assert.True(m.GuestPasses > 0, $"the guest made no pass across move {m.Index}"));
        Assert.NotNull(result.Guest);
        Assert.Equal(0, result.Guest!.Errors);
        Assert.Equal(0, result.Guest.Stalls);
        Assert.Null(result.Client);
        Assert.Equal(0, result.Checks.TwoRunning);
        Assert.Equal(0, result.Checks.Lost);
        Assert.Equal(0, result.Checks.WrongAfterMove);
        Assert.Null(result.InvariantBroken);
        for (int i = 1; i < result.Moves.Count; i++) Assert.Equal(result.Moves[i - 1].To, result.Moves[i].From);
        Assert.True(result.Clean);
    }
}
