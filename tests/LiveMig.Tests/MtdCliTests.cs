using System.Diagnostics;
using System.Text.Json;

namespace LiveMig.Tests;

/// <summary><c>livemig mtd simulate</c> as a user runs it: the table, the JSON, the PNG, a bad file's one line.</summary>
public class MtdCliTests
{
    private const string Small = """
        runs: 20
        horizon: 2d
        cloud: {hosts: 6, slots: 8, load: 50%}
        victim: {memory: 256MiB, workload: {rate: 2k, working-set: 64MiB}}
        attacker: {launch-every: 10m, launch-time: 1m, max-vms: 2, attack-time: 2h}
        detector: {check-every: 10m, true-positive: 90%, false-positive: 1%}
        policies: [none, {kind: periodic, every: [1h, 3h]}, {kind: threat, destination: attacker-aware}]
        """;

    [Fact]
    public void Mtd_simulate_prints_the_table_with_the_front_or_json_draws_a_png_and_refuses_a_bad_file_in_one_line()
    {
        string dir = Path.Combine(Path.GetTempPath(), $"livemig-mtd-{Environment.ProcessId}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            string good = Path.Combine(dir, "good.yaml"), bad = Path.Combine(dir, "bad.yaml"), png = Path.Combine(dir, "front.png");
            File.WriteAllText(good, Small);
            File.WriteAllText(bad, "victim: {memory: 256MiB}\nattacker: {attack-time: 2h}\npolicies: [{kind: periodic, evry: 1h}]\n");
            var (code, output, error) = Cli("mtd", "simulate", good, "--png", png);
            Assert.True(code == 0, error);
            Assert.Contains("cost of one move", output);
            Assert.Contains("periodic 1h → random", output);
            Assert.Contains("threat → attacker-aware", output);
            Assert.Contains("front (downtime)", output);
            Assert.Contains("4 configurations × 20 runs", output);
            byte[] head = File.ReadAllBytes(png)[..8];
            Assert.Equal(new byte[] { 0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A }, head);
            (code, output, _) = Cli("mtd", "simulate", good, "--json", "--seed", "9");
            Assert.Equal(0, code);
            using (var doc = JsonDocument.Parse(output))
            {
                Assert.Equal(9UL, doc.RootElement.GetProperty("seed").GetUInt64());
                Assert.Equal(4, doc.RootElement.GetProperty("configurations").GetArrayLength());
                Assert.True(doc.RootElement.GetProperty("moveCosts")[0].GetProperty("bytes").GetInt64() > 0);
            }
            (code, output, error) = Cli("mtd", "simulate", bad);
            Assert.Equal(2, code);
            Assert.Equal("", output);
            Assert.StartsWith($"livemig: mtd simulate: {bad}:3: policies[0].evry: unknown field (expected one of:", error.Trim());
            Assert.DoesNotContain('\n', error.Trim());
        }
        finally { Directory.Delete(dir, recursive: true); }
    }

    [Theory]
    [InlineData("give the schedule: --interval TIME or --poisson MEAN", "mtd", "run", "--moves", "3")]
    [InlineData("give when to stop: --moves N or --duration TIME", "mtd", "run", "--interval", "1s")]
    [InlineData("--workload 'hotcold': mtd run needs kv", "mtd", "run", "--interval", "1s", "--moves", "2", "--workload", "hotcold")]
    [InlineData("--qemu /x.img: no such file", "mtd", "run", "--interval", "1s", "--moves", "2", "--qemu", "/x.img")]
    [InlineData("--workload: not with --qemu", "mtd", "run", "--interval", "1s", "--moves", "2", "--qemu", "/x.img", "--workload", "kv")]
    [InlineData("--qemu-kernel: mtd run moves the built-in VM or the boot-sector guest (--qemu IMAGE) only", "mtd", "run", "--interval", "1s", "--moves", "2", "--qemu-kernel", "/x/vmlinuz")]
    [InlineData("--interval 'often': expected a duration", "mtd", "run", "--interval", "often", "--moves", "2")]
    public void Mtd_run_refuses_bad_options_in_one_line_with_exit_code_2(string expected, params string[] args)
    {
        var (code, output, error) = Cli(args);
        Assert.Equal(2, code);
        Assert.Equal("", output);
        Assert.StartsWith("livemig: " + expected, error.Trim());
        Assert.DoesNotContain('\n', error.Trim());
    }

    internal static (int Code, string Out, string Err) Cli(params string[] args) => CliChild.Run(args);
}
