using System.Diagnostics;
using System.Text.Json;
using LiveMig.Simulation;

namespace LiveMig.Tests;

/// <summary>
/// Scenario files (YAML) and <c>livemig simulate</c>: a scenario runs the same way twice for a
/// seed; evacuations run sequentially or in parallel as asked; a bad file is refused in one line
/// naming the field and its line.
/// </summary>
public sealed class SimulatorScenarioTests
{
    private const string TwoVms = """
        seed: 3
        hosts: [a, b]
        links:
          - {name: ab, bandwidth: 1Gbit, latency: 1ms, between: [a, b]}
        defaults:
          downtime-limit: 100ms
          on-stall: throttle
        vms:
          - name: vm
            count: 2
            host: a
            memory: 1GiB
            vcpus: 2
            workload:
              rate: 20k
              working-set: 256MiB
              hot-set: 10%
              hot-writes: 80%
              phases:
                - {at: 5s, rate: 60k}
            content: {zero: 20%, compressible: 50%, bytes-changed: 128}
        migrations:
          - {vm: vm-1, to: b, at: 1s}
          - {vm: vm-2, to: b, at: 2s, compress: lz4, xbzrle-cache: 32MiB, defer-hot-pages: true}
        """;

    [Fact]
    public void A_scenario_gives_the_same_result_for_a_seed_and_another_for_another_seed()
    {
        var scenario = Scenario.Parse(TwoVms);
        string first = ScenarioRunner.Run(scenario).ToJson();
        string again = ScenarioRunner.Run(Scenario.Parse(TwoVms)).ToJson();
        Assert.Equal(first, again);
        var other = ScenarioRunner.Run(scenario, seed: 4);
        Assert.Equal(4UL, other.Seed);
        Assert.NotEqual(first, other.ToJson());
        var r = ScenarioRunner.Run(scenario);
        Assert.Equal(3UL, r.Seed);
        Assert.Equal(2, r.Migrations.Count);
        Assert.All(r.Migrations, m => Assert.Equal("completed", m.Outcome));
        Assert.Equal(1.0, r.Migrations[0].StartS, 9);
        Assert.Equal(2.0, r.Migrations[1].StartS, 9);
        Assert.True(r.Migrations[1].PagesByEncoding["lz4"] > 0);
        Assert.Equal(0, r.Migrations[0].PagesByEncoding["lz4"]);
        using var doc = JsonDocument.Parse(first);
        Assert.Equal("completed", doc.RootElement.GetProperty("migrations")[0].GetProperty("outcome").GetString());
        Assert.True(doc.RootElement.GetProperty("migrations")[0].GetProperty("roundDetails").GetArrayLength() >= 2);
    }

    private static string Evacuation(string how) => $$"""
        hosts: [a, b]
        links:
          - {name: ab, bandwidth: 1Gbit, between: [a, b]}
        vms:
          - {name: vm, count: 3, host: a, memory: 512MiB}
        evacuate: {host: a, to: b, {{how}}}
        """;

    [Fact]
    public void A_sequential_evacuation_moves_one_VM_after_another_and_a_parallel_one_all_at_once_sharing_the_link()
    {
        var seq = ScenarioRunner.Run(Scenario.Parse(Evacuation("order: sequential")));
        var par = ScenarioRunner.Run(Scenario.Parse(Evacuation("order: parallel")));
        double one = seq.Migrations[0].TotalS;
        Assert.Equal((512L << 20) * 4104.0 / 4096 / 125e6, one, 2); // a VM alone: its memory over the link
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(i * one, seq.Migrations[i].StartS, 6);
            Assert.Equal(one, seq.Migrations[i].TotalS, 6);
            Assert.Equal(0, par.Migrations[i].StartS, 9);
            Assert.Equal(3 * one, par.Migrations[i].TotalS, 6); // a third of the link each
        }
        Assert.Equal(seq.EndS, par.EndS, 6); // the link was full all along either way
        var limited = ScenarioRunner.Run(Scenario.Parse(Evacuation("order: parallel, max-parallel: 2")));
        Assert.Equal(0, limited.Migrations[1].StartS, 9);
        Assert.Equal(2 * one, limited.Migrations[2].StartS, 6);
    }

    [Fact]
    public void A_migration_still_running_at_the_horizon_is_unfinished()
    {
        var r = ScenarioRunner.Run(Scenario.Parse("""
            horizon: 2s
            hosts: [a, b]
            links: [{name: ab, bandwidth: 1Gbit, between: [a, b]}]
            vms: [{name: vm, host: a, memory: 1GiB}]
            migrations: [{vm: vm, to: b}]
            """));
        Assert.Equal("unfinished", Assert.Single(r.Migrations).Outcome);
        Assert.Equal(2.0, r.EndS, 3);
    }

    [Fact]
    public void A_migration_that_cannot_start_is_skipped_with_the_reason()
    {
        var r = ScenarioRunner.Run(Scenario.Parse("""
            hosts: [a, b]
            links: [{name: ab, bandwidth: 1Gbit, between: [a, b]}]
            vms: [{name: vm, host: a, memory: 64MiB}]
            migrations:
              - {vm: vm, to: b, at: 0s}
              - {vm: vm, to: b, at: 0.1s}
              - {vm: vm, to: b, at: 10s}
              - {vm: vm, to: a, at: 20s}
            """));
        Assert.Equal(["completed", "skipped", "skipped", "completed"], r.Migrations.Select(m => m.Outcome));
        Assert.Equal("already migrating", r.Migrations[1].Error);
        Assert.Equal("already on b", r.Migrations[2].Error);
        Assert.Equal("b", r.Migrations[3].From);
    }

    [Theory]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: fast, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations: [{vm: v, to: b}]", "scenario:2: links[0].bandwidth: expected a rate such as 1Gbit or 100MiB/s, got 'fast'")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms:\n  - name: v\n    host: a\n    memroy: 1GiB\nmigrations: [{vm: v, to: b}]", "scenario:4: vms[0].memory: missing (required)")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms:\n  - name: v\n    host: a\n    memory: 1GiB\n    vcpu: 2\nmigrations: [{vm: v, to: b}]", "scenario:7: vms[0].vcpu: unknown field")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: c, memory: 1GiB}]\nmigrations: [{vm: v, to: b}]", "scenario:3: vms[0].host: no host 'c'")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: w, to: b}", "scenario:5: migrations[0].vm: no VM 'w'")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, strategy: postcopyy}", "scenario:5: migrations[0].strategy: expected precopy, postcopy, hybrid; got 'postcopyy'")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, hybrid-budget: {rounds: 3}}", "scenario:5: migrations[0].hybrid-budget: only with strategy: hybrid")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, strategy: hybrid, hybrid-budget: {roundz: 3}}", "scenario:5: migrations[0].hybrid-budget.roundz: unknown field (expected one of: bytes, rounds, time)")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, strategy: postcopy, dedup: true}", "scenario:5: migrations[0].dedup: not with strategy: postcopy")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, strategy: postcopy, downtime-limit: 1s}", "scenario:5: migrations[0].downtime-limit: not with strategy: postcopy (it has no pre-copy rounds)")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, prepaging: false}", "scenario:5: migrations[0].prepaging: only when the migration may switch to post-copy")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: b, on-stall: pause}", "scenario:5: migrations[0].on-stall: pause needs max-downtime")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms:\n  - name: v\n    host: a\n    memory: 1GiB\n    content: {zero: 70%, compressible: 50%}\nmigrations: [{vm: v, to: b}]", "scenario:7: vms[0].content.zero: the shares add up to more than 1 (1.2)")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB, workload: {rate: 10, working-set: 2GiB}}]\nmigrations: [{vm: v, to: b}]", "scenario:3: vms[0].workload.working-set: larger than the VM's memory")]
    [InlineData("hosts: [a, b, c]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations:\n  - {vm: v, to: c}", "scenario:5: migrations: no route from a (where v starts) to c")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations: [{vm: v, to: b}\n", "scenario:5: YAML:")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]", "scenario:1: migrations: nothing to simulate")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB, trace: missing.lmtrace}]\nmigrations: [{vm: v, to: b}]", "scenario:3: vms[0].trace:")]
    [InlineData("hosts: [a, b]\nhorizon: 0s\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB}]\nmigrations: [{vm: v, to: b}]", "scenario:2: horizon: expected a positive duration")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB, workload: {reads: {rate: 10, wokring-set: 1GiB}}}]\nmigrations: [{vm: v, to: b}]", "scenario:3: vms[0].workload.reads.wokring-set: unknown field")]
    [InlineData("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB, workload: {reads: {working-set: 1GiB}}}]\nmigrations: [{vm: v, to: b}]", "scenario:3: vms[0].workload.reads.rate: missing (required)")]
    public void A_bad_scenario_is_refused_in_one_line_naming_the_field_and_line(string yaml, string expected)
    {
        var e = Assert.Throws<ScenarioException>(() => Scenario.Parse(yaml, "scenario", Path.GetTempPath()));
        Assert.StartsWith(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void A_hand_workload_reads_are_read_with_their_working_set()
    {
        var s = Scenario.Parse("hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: 1GiB, workload: {rate: 10, reads: {rate: 50k, working-set: 256MiB}}}]\nmigrations: [{vm: v, to: b, strategy: postcopy}]", "scenario", Path.GetTempPath());
        Assert.Equal(new ReadModel(50_000, 65_536), s.Vms[0].Reads);
        Assert.Null(Scenario.Parse(TwoVms).Vms[0].Reads);
        var r = ScenarioRunner.Run(s);
        Assert.True(r.Migrations[0].PagesRequested > 0, "reads of pages not yet there fault");
    }

    [Fact]
    public void The_example_scenarios_load_and_run()
    {
        string dir = Path.Combine(Repo.Root, "scenarios");
        Skip.IfNot(Directory.Exists(dir), $"{dir} is not there");
        foreach (string f in Directory.GetFiles(dir, "*.yaml").Where(f => !Path.GetFileName(f).StartsWith("mtd-", StringComparison.Ordinal))) // mtd-*: livemig mtd simulate's (MtdModelTests)
        {
            var r = ScenarioRunner.Run(Scenario.Load(f));
            Assert.NotEmpty(r.Migrations);
            Assert.All(r.Migrations, m => Assert.Equal("completed", m.Outcome));
        }
    }

    [Fact]
    public void Livemig_simulate_prints_a_table_or_json_and_refuses_a_bad_file_in_one_line()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"livemig-sim-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            string good = Path.Combine(dir, "good.yaml"), bad = Path.Combine(dir, "bad.yaml");
            File.WriteAllText(good, TwoVms);
            File.WriteAllText(bad, "hosts: [a, b]\nlinks: [{name: l, bandwidth: 1Gbit, between: [a, b]}]\nvms: [{name: v, host: a, memory: lots}]\nmigrations: [{vm: v, to: b}]\n");
            var (code, output, error) = Cli("simulate", good);
            Assert.Equal(0, code);
            Assert.Contains("downtime ms", output);
            Assert.Contains("vm-1", output);
            Assert.Contains("2 of 2 migrations completed", output);
            (code, output, _) = Cli("simulate", good, "--json", "--seed", "9");
            Assert.Equal(0, code);
            using (var doc = JsonDocument.Parse(output)) Assert.Equal(9UL, doc.RootElement.GetProperty("seed").GetUInt64());
            (code, output, error) = Cli("simulate", bad);
            Assert.Equal(2, code);
            Assert.Equal("", output);
            Assert.Equal($"livemig: simulate: {bad}:3: vms[0].memory: expected a size such as 4GiB (at least 4.0 KiB), got 'lots'", error.Trim());
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void Livemig_simulate_png_draws_the_timeline_and_the_links_into_a_png_file()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"livemig-simpng-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            string good = Path.Combine(dir, "good.yaml"), png = Path.Combine(dir, "out.png");
            File.WriteAllText(good, """
                hosts: [a, b]
                links: [{name: ab, bandwidth: 1Gbit, latency: 0.2ms, between: [a, b]}]
                vms: [{name: v, host: a, memory: 256MiB, workload: {rate: 20k, working-set: 64MiB}}]
                migrations:
                  - {vm: v, to: b, at: 0s}
                  - {vm: v, to: a, at: 5s, strategy: postcopy}
                  - {vm: v, to: b, at: 10s, strategy: hybrid}
                """);
            var (code, output, error) = Cli("simulate", good, "--png", png);
            Assert.True(code == 0, error);
            Assert.Contains("postcopy", output);
            Assert.Contains("hybrid", output);
            byte[] bytes = File.ReadAllBytes(png);
            Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, bytes[..8]);
            Assert.True(bytes.Length > 20_000, $"{bytes.Length} bytes");
            // IHDR: the width and height, big-endian, after the signature and the chunk's length and type.
            int width = System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(16)), height = System.Buffers.Binary.BinaryPrimitives.ReadInt32BigEndian(bytes.AsSpan(20));
            Assert.True(width >= 1000 && height >= 500, $"{width}×{height}");
            // A directory that does not exist: one line, exit 2.
            (code, _, error) = Cli("simulate", good, "--png", Path.Combine(dir, "no", "such", "dir", "x.png"));
            Assert.Equal(2, code);
            Assert.StartsWith("livemig: simulate: --png:", error.Trim());
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Fact]
    public void The_timeline_is_recorded_only_when_asked_and_follows_the_phases()
    {
        var scenario = Scenario.Parse(TwoVms);
        var plain = ScenarioRunner.Run(scenario);
        Assert.All(plain.Migrations, m => Assert.Null(m.Phases));
        Assert.All(plain.Links, l => Assert.Null(l.Rates));
        var timed = new ScenarioRunner(scenario) { RecordTimeline = true }.Run();
        Assert.Equal(plain.Migrations.Select(m => m.TotalS), timed.Migrations.Select(m => m.TotalS));
        foreach (var m in timed.Migrations)
        {
            Assert.Equal("handshake", m.Phases![0].Kind);
            Assert.Equal("downtime", m.Phases[^1].Kind);
            Assert.Equal(m.Rounds - 1, m.Phases.Count(p => p.Kind == "round")); // the stop-and-copy is the downtime
            Assert.Equal(m.StartS + m.TotalS, m.Phases[^1].EndS, 6);
            Assert.Equal(m.DowntimeMs, (m.Phases[^1].EndS - m.Phases[^1].StartS) * 1000, 1e-3); // a tolerance, not a rounding to 3 places (which flips at a boundary)
            for (int i = 1; i < m.Phases.Count; i++) Assert.True(m.Phases[i].StartS >= m.Phases[i - 1].EndS - 1e-9);
        }
        var rates = Assert.Single(timed.Links).Rates!;
        Assert.All(rates, p => Assert.InRange(p.BytesPerSecond, 0, timed.Links[0].BytesPerSecond * (1 + 1e-9)));
        Assert.Contains(rates, p => p.BytesPerSecond > 0);
        Assert.Equal(0, rates[^1].BytesPerSecond);
    }

    private static (int Code, string Out, string Err) Cli(params string[] args) => CliChild.Run(args);
}
