using LiveMig.Traces;

namespace LiveMig.Tests;

public class TraceShowTests
{
    private static TraceInterval Iv(int index, int space, params int[] pages) => TraceFormatTests.Interval(index, space, pages);

    [Fact]
    public void Working_set_counts_distinct_pages_per_window_that_fits_in_the_trace()
    {
        var ivs = new[] { Iv(1, 8, 1, 2), Iv(2, 8, 2, 3), Iv(3, 8, 4), Iv(4, 8, 1) };
        // Interval k starts at 100 ms x k here (TraceFormatTests.Interval); windows start at each interval.
        var w = TraceStats.WorkingSet(ivs, 8, TimeSpan.FromMilliseconds(200));
        Assert.Equal([3, 3, 2], w.Pages);
        Assert.Equal([0.1, 0.2, 0.3], w.StartSeconds.Select(s => Math.Round(s, 3)));
        Assert.Equal([2, 2, 1, 1], TraceStats.WorkingSet(ivs, 8, TimeSpan.FromMilliseconds(100)).Pages);
        Assert.Equal([4], TraceStats.WorkingSet(ivs, 8, TimeSpan.FromMilliseconds(400)).Pages);
    }

    [Fact]
    public void Stats_give_rates_and_content_shares()
    {
        var s = TraceStats.Of(TraceFile.Read(TraceFormatTests.Sample()));
        Assert.Equal(2, s.DirtyRate.Length);
        Assert.Equal(50, s.DirtyRate[0], 6); // 5 pages in 100 ms
        Assert.Equal(7, s.Writes.Pages);
        Assert.Equal(1.0 / 7, s.Writes.Duplicate, 6); // page 7 in interval 1
        Assert.Equal(10, s.InitialImage.Pages);
    }

    [Fact]
    public void Show_draws_three_pictures_and_refuses_a_damaged_file_in_one_line()
    {
        string dir = Directory.CreateTempSubdirectory("lmshow").FullName;
        try
        {
            string path = Path.Combine(dir, "t.lmtrace");
            File.WriteAllBytes(path, TraceWorkloadTests.Synthetic(pages: 2000, intervals: 30, perInterval: 300, seed: 9));
            Assert.Equal(0, LiveMig.Cli.Program.Main(["trace", "show", path, "--png", dir]));
            foreach (string png in new[] { "heatmap.png", "dirty-rate.png", "wws.png" })
                Assert.True(new FileInfo(Path.Combine(dir, png)).Length > 10_000, png);
            Assert.Equal(0, LiveMig.Cli.Program.Main(["trace", "show", path, "--json"]));
            File.WriteAllBytes(path, File.ReadAllBytes(path)[..500]);
            Assert.Equal(1, LiveMig.Cli.Program.Main(["trace", "show", path]));
            Assert.Equal(2, LiveMig.Cli.Program.Main(["trace", "show", Path.Combine(dir, "missing.lmtrace")]));
            Assert.Equal(2, LiveMig.Cli.Program.Main(["trace", "record", "--interval", "5ms", "--pid", "1"]));
            Assert.Equal(2, LiveMig.Cli.Program.Main(["trace", "record", "--pid", "1", "--", "true"]));
            Assert.Equal(2, LiveMig.Cli.Program.Main(["trace", "record"]));
            Assert.Equal(2, LiveMig.Cli.Program.Main(["trace", "record", "--pid", "999999999"]));
            Assert.Equal(2, LiveMig.Cli.Program.Main(["trace", "record", "--pid", "1", "--duration", "50ms"]));
        }
        finally { Directory.Delete(dir, true); }
    }
}
