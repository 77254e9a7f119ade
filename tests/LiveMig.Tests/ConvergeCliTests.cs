using System.CommandLine;
using LiveMig.Cli;

namespace LiveMig.Tests;

/// <summary>The convergence options as the CLI parses them (in process: no console, no VM).</summary>
public class ConvergeCliTests
{
    private static LiveMig.Engine.MigrationOptions Parse(params string[] args)
    {
        var o = new CliOptions();
        var c = new Command("demo");
        o.AddMigrationOptions(c);
        var r = c.Parse(args);
        Assert.Empty(r.Errors);
        return o.MigrationOptions(r);
    }

    [Fact]
    public void Off_unless_asked_for()
    {
        var p = Parse().PreCopy;
        Assert.False(p.DeferHotPages || p.SkipRewrittenPages || p.PredictiveStop);
        Assert.Null(p.AutoConverge);
        Assert.Equal(0, p.DirtyLimit);
    }

    [Fact]
    public void Each_option_turns_its_aid_on()
    {
        var p = Parse("--defer-hot-pages", "--predictive-stop", "--auto-converge", "--dirty-limit", "2500").PreCopy;
        Assert.True(p.DeferHotPages && p.SkipRewrittenPages && p.PredictiveStop);
        Assert.Equal(new LiveMig.Policies.AutoConvergeOptions(), p.AutoConverge); // QEMU's 20/10/99
        Assert.Equal(2500, p.DirtyLimit);

        var a = Parse("--auto-converge", "30,5%,90").PreCopy.AutoConverge!;
        Assert.Equal(0.30, a.Initial, 9);
        Assert.Equal(0.05, a.Increment, 9);
        Assert.Equal(0.90, a.Max, 9);
        Assert.Equal(0.99, Parse("--auto-converge", "40,20").PreCopy.AutoConverge!.Max, 9);
    }

    [Theory]
    [InlineData("--auto-converge", "150,10")]
    [InlineData("--auto-converge", "20")]
    [InlineData("--auto-converge", "20,x")]
    [InlineData("--auto-converge", "50,10,40")]
    [InlineData("--auto-converge", "0,10")]
    [InlineData("--dirty-limit", "fast")]
    [InlineData("--dirty-limit", "0")]
    [InlineData("--dirty-limit", "-5")]
    public void Bad_values_get_one_line_naming_the_option(string option, string value)
    {
        var e = Assert.Throws<UsageException>(() => Parse(option, value));
        Assert.StartsWith($"{option} '{value}': ", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }
}
