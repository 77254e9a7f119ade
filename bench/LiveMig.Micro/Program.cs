using System.Globalization;
using BenchmarkDotNet.Columns;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using LiveMig.Micro;

// `--ratios` prints the wire bytes per page of each codec on each content (no timing);
// anything else goes to BenchmarkDotNet, e.g. `--filter '*' --job short`.
if (args.Contains("--ratios"))
{
    Console.WriteLine("| codec | zero | random | text | mixed |");
    Console.WriteLine("|---|---:|---:|---:|---:|");
    foreach (string codec in new[] { "raw", "lz4", "zstd1", "zstd3", "adaptive", "xbzrle", "dedup" })
    {
        var cells = new[] { "zero", "random", "text", "mixed" }.Select(c =>
            new CodecBenchmarks { Codec = codec, Content = c }.WireBytesPerPage().ToString("0", CultureInfo.InvariantCulture));
        Console.WriteLine($"| {codec} | {string.Join(" | ", cells)} |");
    }
    return;
}
var config = DefaultConfig.Instance.AddColumn(new PagesPerSecondColumn());
BenchmarkSwitcher.FromAssembly(typeof(CodecBenchmarks).Assembly).Run(args, config);

/// <summary>Pages per second from the mean time per operation (one operation = one page).</summary>
internal sealed class PagesPerSecondColumn : IColumn
{
    public string Id => "PagesPerSecond";
    public string ColumnName => "Pages/s";
    public bool AlwaysShow => true;
    public ColumnCategory Category => ColumnCategory.Custom;
    public int PriorityInCategory => 0;
    public bool IsNumeric => true;
    public UnitType UnitType => UnitType.Dimensionless;
    public string Legend => "Pages per second (1 / mean time per page)";
    public bool IsDefault(Summary summary, BenchmarkDotNet.Running.BenchmarkCase benchmarkCase) => false;
    public bool IsAvailable(Summary summary) => true;
    public string GetValue(Summary summary, BenchmarkDotNet.Running.BenchmarkCase benchmarkCase) => GetValue(summary, benchmarkCase, SummaryStyle.Default);

    public string GetValue(Summary summary, BenchmarkDotNet.Running.BenchmarkCase benchmarkCase, SummaryStyle style)
    {
        var s = summary[benchmarkCase]?.ResultStatistics;
        if (s is null || s.Mean <= 0) return "-";
        double perSecond = 1e9 / s.Mean;
        return perSecond >= 1e6 ? (perSecond / 1e6).ToString("0.00", CultureInfo.InvariantCulture) + " M" : (perSecond / 1e3).ToString("0.0", CultureInfo.InvariantCulture) + " k";
    }
}
