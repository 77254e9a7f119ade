using LiveMig.Core;
using LiveMig.Engine;
using LiveMig.Reporting;

namespace LiveMig.Tests;

/// <summary>The live figures of a migration (<c>livemig status</c>) on a virtual clock: what each side shows between and within rounds.</summary>
public class MigrationProgressTests
{
    [Fact]
    public void The_source_shows_the_round_in_progress_then_the_last_rounds_figures_and_the_policys_estimate()
    {
        var clock = new VirtualClock();
        long cap = 100 << 20;
        var p = new MigrationProgress(Guid.NewGuid(), "source", "precopy", "vm", 1L << 30, "dst:7480", clock) { BandwidthLimit = () => cap };
        var s = p.Snapshot();
        Assert.Equal(("handshake", -1, -1L, -1.0), (s.Phase, s.Round, s.PagesRemaining, s.ExpectedDowntimeMs));

        p.Phase("live");
        p.RoundStarted(0, 1000, final: false);
        p.Progress(0, 100, 1000, 1 << 20);
        clock.Advance(TimeSpan.FromSeconds(1));
        p.Progress(0, 400, 1000, 11 << 20);
        s = p.Snapshot();
        Assert.Equal(("live", 0, 600L, 400L), (s.Phase, s.Round, s.PagesRemaining, s.PagesTransferred));
        Assert.Equal(10 << 20, s.BandwidthBytesPerSecond, 1); // 10 MiB in the second since the round's first progress
        Assert.Equal(-1, s.ExpectedDowntimeMs); // no round completed yet
        Assert.Equal(cap, s.BandwidthLimitBytesPerSecond);
        Assert.Equal(1000, s.ElapsedMs, 1);

        p.Progress(0, 1000, 1000, 30 << 20);
        p.RoundCompleted(new RoundReport { Round = 0, PagesSent = 1000, PagesDirtied = 120, BandwidthBytesPerSecond = 20 << 20, DirtyRatePagesPerSecond = 300, EstimatedDowntimeMs = 24 });
        cap = 0; // set-bandwidth unlimited
        s = p.Snapshot();
        Assert.Equal((120L, 1000L, 300.0, 24.0, 0L), (s.PagesRemaining, s.PagesTransferred, s.DirtyRatePagesPerSecond, s.ExpectedDowntimeMs, s.BandwidthLimitBytesPerSecond));
        Assert.Equal(20 << 20, s.BandwidthBytesPerSecond);
        Assert.Equal(30 << 20, s.BytesTransferred);

        p.Phase("paused");
        p.RoundStarted(1, 120, final: true);
        p.RoundCompleted(new RoundReport { Round = 1, Final = true, PagesSent = 120, BandwidthBytesPerSecond = 20 << 20 });
        s = p.Snapshot();
        Assert.Equal(("paused", 1, 0L, 1120L, 0.0), (s.Phase, s.Round, s.PagesRemaining, s.PagesTransferred, s.ExpectedDowntimeMs));
    }

    [Fact]
    public void The_destination_counts_down_what_the_source_announced_and_estimates_the_downtime_from_the_source_figures()
    {
        var clock = new VirtualClock();
        var p = new MigrationProgress(Guid.NewGuid(), "destination", "precopy", "vm", 1L << 30, "", clock);
        p.Phase("live");
        p.Announced(5000);
        p.DestinationRoundStarted(0, final: false);
        p.Received(4 << 20, 1000);
        var s = p.Snapshot();
        Assert.Equal((0, 4000L, 1000L), (s.Round, s.PagesRemaining, s.PagesTransferred));

        // Round 0: 5000 pages, 20 MB in 2 s; 800 pending after it: 800 × 4000 B at 10 MB/s = 320 ms.
        p.DestinationRoundEnded(5000, 800, 20_000_000, 2000);
        s = p.Snapshot();
        Assert.Equal((800L, 5000L), (s.PagesRemaining, s.PagesTransferred));
        Assert.Equal(10_000_000, s.BandwidthBytesPerSecond, 1);
        Assert.Equal(320, s.ExpectedDowntimeMs, 3);
        Assert.Equal(400, s.DirtyRatePagesPerSecond, 3);

        p.DestinationRoundStarted(1, final: true);
        p.Received(24 << 20, 300);
        s = p.Snapshot();
        Assert.Equal(("paused", 1, 500L, 5300L), (s.Phase, s.Round, s.PagesRemaining, s.PagesTransferred));
        p.SetStrategy("hybrid");
        Assert.Equal("hybrid", p.Snapshot().Strategy);
    }

    [Fact]
    public void Status_and_listing_json_round_trip_with_camel_case_names()
    {
        var s = new MigrationStatus { MigrationId = Guid.NewGuid().ToString(), Phase = "live", Round = 3, PagesRemaining = 42, ExpectedDowntimeMs = 12.5 };
        string json = s.ToJson();
        Assert.Contains("\"pagesRemaining\":42", json);
        Assert.Contains("\"expectedDowntimeMs\":12.5", json);
        Assert.Equal(s, MigrationStatus.FromJson(json));
        var l = new AgentListing { Vms = [new HostedVmInfo { Name = "a\u001b[2J", State = "running" }], Migrations = [s] };
        string lj = l.ToJson();
        Assert.DoesNotContain('\u001b', lj); // control characters from a peer travel escaped
        var back = AgentListing.FromJson(lj);
        Assert.Equal("a\u001b[2J", back.Vms.Single().Name);
        Assert.Equal(s, back.Migrations.Single());
    }
}
