using System.Diagnostics;
using System.Text.RegularExpressions;

namespace LiveMig.Tests;

/// <summary>The command line's QEMU guests: listen --qemu-allow, migrate --qemu, and what is refused with them (trait qemu).</summary>
[Trait("Category", "Qemu")]
public class QemuCliTests
{

    private static Process Start(params string[] args) => CliChild.Start(args);

    private static (int Code, string Out, string Err) Run(params string[] args)
    {
        using var p = Start(args);
        var err = p.StandardError.ReadToEndAsync();
        string output = p.StandardOutput.ReadToEnd();
        Assert.True(p.WaitForExit(120_000), $"livemig {string.Join(' ', args)} did not exit");
        return (p.ExitCode, output, err.Result);
    }

    [Theory]
    [InlineData("--auto-converge", "--auto-converge: not with --qemu: a QEMU guest has no brakes")]
    [InlineData("--dirty-limit 100", "--dirty-limit: not with --qemu: a QEMU guest has no brakes LiveMig can apply: QEMU throttles vCPUs only inside its own migration (auto-converge), and its dirty limit (set-vcpu-dirty-limit) needs KVM")]
    [InlineData("--workload sweep", "--workload: not with --qemu")]
    public void What_a_QEMU_guest_cannot_do_is_refused_in_one_line_before_QEMU_starts(string extra, string expected)
    {
        string image = Path.Combine(Directory.CreateTempSubdirectory("lmqemu-cli").FullName, "boot.img");
        File.WriteAllBytes(image, new byte[512]);
        string psk = Path.Combine(Path.GetDirectoryName(image)!, "psk");
        File.WriteAllText(psk, "a pre-shared key of enough bytes for --tls\n");
        var (code, _, err) = Run(["migrate", "--qemu", image, "--to", "127.0.0.1:1", .. extra.Replace("PSK", psk).Split(' ')]);
        Assert.Equal(2, code);
        Assert.StartsWith("livemig: " + expected, err);
        Assert.Single(err.TrimEnd().Split('\n'));
    }

    [Theory]
    [InlineData("--qemu IMG --qemu-kernel KERNEL", "--qemu and --qemu-kernel: give one (a boot image or a kernel)")]
    [InlineData("--qemu IMG --qemu-initrd KERNEL", "--qemu-initrd: only with --qemu-kernel")]
    [InlineData("--qemu-forward 6379", "--qemu-forward: only with --qemu IMAGE or --qemu-kernel KERNEL")]
    [InlineData("--qemu-kernel KERNEL --qemu-forward 0", "--qemu-kernel: forward port 0 is out of range (1..65535)")]
    [InlineData("--qemu-kernel KERNEL --qemu-forward 80,80", "--qemu-kernel: forward lists a port twice")]
    [InlineData("--qemu-kernel KERNEL --qemu-forward redis", "--qemu-forward 'redis': expected guest TCP ports separated by commas")]
    [InlineData("--qemu-kernel /nonexistent/vmlinuz", "--qemu-kernel /nonexistent/vmlinuz: no such file")]
    public void A_kernel_guest_and_its_forwarded_ports_are_checked_in_one_line_before_QEMU_starts(string extra, string expected)
    {
        string dir = Directory.CreateTempSubdirectory("lmqemu-cli").FullName;
        string image = Path.Combine(dir, "boot.img"), kernel = Path.Combine(dir, "vmlinuz");
        File.WriteAllBytes(image, new byte[512]);
        File.WriteAllBytes(kernel, new byte[512]);
        var (code, _, err) = Run(["migrate", "--to", "127.0.0.1:1", .. extra.Replace("IMG", image).Replace("KERNEL", kernel).Split(' ')]);
        Assert.Equal(2, code);
        Assert.StartsWith("livemig: " + expected, err);
        Assert.Single(err.TrimEnd().Split('\n'));
    }

    [SkippableFact]
    public void Demo_boots_the_Linux_guest_and_each_side_forwards_the_guests_port_from_a_port_of_its_own()
    {
        string dir = LinuxGuest.Directory();
        var (code, _, err) = Run("demo", "--qemu-kernel", Path.Combine(dir, "vmlinuz"), "--qemu-initrd", Path.Combine(dir, "initrd.gz"),
            "--qemu-forward", "6379", "--memory", "256MiB", "--vcpus", "1", "--warmup", "3s");
        Assert.True(code == 0, err);
        var ports = Regex.Matches(err, @"guest port 6379 at 127\.0\.0\.1:(\d+)").Select(m => int.Parse(m.Groups[1].Value)).ToList();
        Assert.Equal(2, ports.Count); // the source's, then the destination's
        Assert.NotEqual(ports[0], ports[1]);
        Assert.Contains("destination guest: running; its console is in", err);
    }

    [Fact]
    public void Demo_refuses_another_demand_paging_for_a_QEMU_guest()
    {
        string image = Path.Combine(Directory.CreateTempSubdirectory("lmqemu-cli").FullName, "boot.img");
        File.WriteAllBytes(image, new byte[512]);
        var (code, _, err) = Run("demo", "--qemu", image, "--strategy", "postcopy", "--demand-paging", "portable");
        Assert.Equal(2, code);
        Assert.StartsWith("livemig: --demand-paging: not with --qemu: a QEMU guest's missing pages are always caught where QEMU faults on them", err);
    }

    [SkippableFact]
    public void Migrate_qemu_moves_the_guest_to_an_agent_that_allows_its_image()
    {
        string image = QemuGuest.Image(48);
        using var agent = Start("listen", "--port", "0", "--once", "--json", "--qemu-allow", Path.GetDirectoryName(image)!, "--control", Path.Combine(Path.GetTempPath(), $"lm-qa-{Guid.NewGuid():N}.sock"));
        int port = 0;
        var seen = new List<string>();
        while (port == 0)
        {
            string? line = agent.StandardError.ReadLine();
            Assert.True(line is not null, "listen ended before listening: " + string.Join(" | ", seen));
            seen.Add(line!);
            if (Regex.Match(line!, @"listening on [0-9.]+:(\d+)") is { Success: true } m) port = int.Parse(m.Groups[1].Value);
        }
        var agentErr = agent.StandardError.ReadToEndAsync();
        var agentOut = agent.StandardOutput.ReadToEndAsync();
        try { MigrateTo(port, image, agent, agentErr, agentOut); }
        finally { if (!agent.HasExited) agent.Kill(entireProcessTree: true); } // a failed test leaves no agent waiting
    }

    private static void MigrateTo(int port, string image, Process agent, Task<string> agentErr, Task<string> agentOut)
    {
        var (code, output, err) = Run("migrate", "--qemu", image, "--memory", "64MiB", "--vcpus", "1", "--warmup", "500ms", "--to", $"127.0.0.1:{port}",
            "--max-rounds", "3", "--on-stall", "pause", "--max-downtime", "20s", "--json", "--control", Path.Combine(Path.GetTempPath(), $"lm-qm-{Guid.NewGuid():N}.sock"));
        Assert.True(code == 0, $"migrate --qemu failed ({code}): {err}");
        Assert.Contains("\"outcome\":\"completed\"", output);
        Assert.Contains(QemuGuest.AgentBuilt ? "\"dirtyLog\":\"qemu-uffd-wp\"" : "\"dirtyLog\":\"page-hash\"", output);
        Assert.True(agent.WaitForExit(60_000), "the agent (--once) did not exit after the arrival");
        Assert.True(agent.ExitCode == 0, $"agent failed: {agentErr.Result}");
        Assert.Contains("\"outcome\":\"completed\"", agentOut.Result);
    }
}
