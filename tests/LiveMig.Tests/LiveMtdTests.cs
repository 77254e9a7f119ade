using LiveMig.Mtd;
using LiveMig.Vm;

namespace LiveMig.Tests;

/// <summary><c>mtd run</c>'s engine (issue 16, item 5): a kv VM kept moving between three real agents over loopback TCP.</summary>
public class LiveMtdTests
{
    private static VmConfig Kv(string name) => new() { Name = name, MemoryBytes = 64L << 20, Vcpus = 2, Workload = "kv", Fill = MemoryFill.Mixed, Seed = 3 };

    [Fact]
    [Trait("Category", "Heavy")]
    public void Twenty_consecutive_moves_between_three_agents_lose_no_request_and_the_vm_is_on_exactly_one_host_at_every_look()
    {
        using var mtd = new LiveMtd(new LiveMtdOptions { Vm = Kv("mtd-kv"), Agents = 3, Interval = TimeSpan.FromMilliseconds(50), Moves = 20, Seed = 11, Warmup = TimeSpan.FromMilliseconds(200) });
        var seen = new List<LiveMove>();
        var r = mtd.Run(seen.Add);
        Assert.Null(r.Stopped);
        Assert.Equal(20, r.Completed);
        Assert.Equal(0, r.Failed);
        Assert.Equal(seen, r.Moves);
        Assert.All(r.Moves, m =>
        {
            Assert.True(m.Verified, $"move {m.Index} not verified");
            Assert.Equal("completed", m.Outcome);
            Assert.NotEqual(m.From, m.To);
            Assert.True(m.DowntimeMs > 0 && m.BytesOnWire > 0);
            Assert.Equal(0, m.ClientErrors);
        });
        // Each move leaves from where the last one arrived; all three agents are used.
        for (int i = 1; i < r.Moves.Count; i++) Assert.Equal(r.Moves[i - 1].To, r.Moves[i].From);
        Assert.Equal(3, r.Moves.Select(m => m.To).Append(r.Moves[0].From).Distinct().Count());
        Assert.NotNull(r.Client);
        Assert.Null(r.Guest);
        Assert.Equal(0, r.Client!.Errors);
        Assert.Equal(0, r.Client.Mismatches);
        Assert.Null(r.Client.Failure);
        Assert.True(r.Client.Count > 100, $"{r.Client.Count} requests");
        Assert.True(r.Checks.Looks > 20, $"{r.Checks.Looks} looks");
        Assert.Equal(0, r.Checks.TwoRunning);
        Assert.Equal(0, r.Checks.Lost);
        Assert.Equal(0, r.Checks.WrongAfterMove);
        Assert.Null(r.InvariantBroken);
        Assert.True(r.Clean);
    }

    [Fact]
    public void A_move_that_fails_ends_the_run_with_the_vm_still_running_where_it_was()
    {
        // An agent that stops listening: the move to it fails at connect, and the VM stays put.
        using var mtd = new LiveMtd(new LiveMtdOptions { Vm = Kv("mtd-fail"), Agents = 3, Interval = TimeSpan.Zero, Moves = 50, Seed = 2, Warmup = TimeSpan.Zero });
        var agents = mtd.Agents;
        agents[1].Dispose();
        agents[2].Dispose();
        var r = mtd.Run();
        var only = Assert.Single(r.Moves);
        Assert.Equal("failed", only.Outcome);
        Assert.Contains("cannot connect", only.Error);
        Assert.Equal(1, r.Failed);
        Assert.Contains("keeps running on", r.Stopped);
        Assert.False(r.Clean);
        Assert.Equal(0, r.Checks.Lost);
        Assert.Null(r.InvariantBroken); // checked where it is: still on the first agent
        Assert.Equal(VmRunState.Running, agents[0].Registry.Find("mtd-fail")!.State);
    }

    [Theory]
    [InlineData(2, 10, null, "agents: 2")]
    [InlineData(3, null, null, "give the schedule")]
    public void Bad_options_are_refused_before_anything_starts(int agents, int? intervalMs, int? moves, string expected)
    {
        var o = new LiveMtdOptions { Vm = Kv("x"), Agents = agents, Interval = intervalMs is { } i ? TimeSpan.FromMilliseconds(i) : null, Moves = moves ?? 5 };
        Assert.Contains(expected, Assert.Throws<ArgumentException>(() => new LiveMtd(o)).Message);
        Assert.Contains("must be kv", Assert.Throws<ArgumentException>(() => new LiveMtd(new LiveMtdOptions { Vm = Kv("y") with { Workload = "hotcold" }, Interval = TimeSpan.Zero, Moves = 1 })).Message);
    }
}
