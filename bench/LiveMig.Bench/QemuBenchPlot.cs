using ScottPlot;

namespace LiveMig.Bench;

/// <summary>
/// The figure of <c>qemu-precopy --png</c>: one bar per system in three panels — total time,
/// downtime, bytes at the socket (medians over the repetitions) — a system that did not
/// converge drawn grey at the time it was given, with no downtime bar.
/// </summary>
internal static class QemuBenchPlot
{
    private const int Width = 1400, PanelHeight = 420;

    public static void Draw(IReadOnlyList<QemuPreCopyScenario.Row> rows, string path, string subtitle)
    {
        var systems = rows.Select(r => r.System).Distinct().ToList();
        var medians = systems.Select(name =>
        {
            var mine = rows.Where(r => r.System == name).ToList();
            var done = mine.Where(r => r.Completed).ToList();
            bool converged = done.Count * 2 > mine.Count; // most repetitions completed
            var use = converged ? done : mine;
            return (Name: name, Converged: converged, Total: Stats.Median([.. use.Select(r => r.TotalS)]),
                Downtime: converged ? Stats.Median([.. done.Select(r => r.DowntimeMs)]) : 0, MiB: Stats.Median([.. use.Select(r => r.SocketBytes / 1048576.0)]));
        }).ToList();
        var multi = new Multiplot();
        multi.AddPlots(3);
        Panel(multi.GetPlot(0), medians.Select(m => (m.Name, m.Converged, m.Total)).ToList(), "total time (s)", $"QEMU's pre-copy and LiveMig's: {subtitle}");
        Panel(multi.GetPlot(1), medians.Select(m => (m.Name, m.Converged, m.Downtime)).ToList(), "downtime (ms)", "downtime (each system's own figure; n/c: did not converge)");
        Panel(multi.GetPlot(2), medians.Select(m => (m.Name, m.Converged, m.MiB)).ToList(), "MiB at the socket", "bytes at the socket (both directions); grey: did not converge in the time given");
        multi.SavePng(path, Width, PanelHeight * 3);
    }

    private static void Panel(Plot plot, List<(string Name, bool Converged, double Value)> bars, string yLabel, string title)
    {
        var qemu = Colors.Orange;
        var ours = Colors.SteelBlue;
        var list = new List<Bar>();
        for (int i = 0; i < bars.Count; i++)
        {
            var (name, converged, value) = bars[i];
            var color = !converged ? Colors.LightGray : name.StartsWith("QEMU", StringComparison.Ordinal) ? qemu : ours;
            string label = !converged && value == 0 ? "n/c" : value >= 100 ? value.ToString("0") : value.ToString("0.0");
            list.Add(new Bar { Position = i, Value = value, FillColor = color, Label = label });
        }
        var series = plot.Add.Bars(list);
        series.ValueLabelStyle.FontSize = 11;
        var ticks = new ScottPlot.TickGenerators.NumericManual();
        for (int i = 0; i < bars.Count; i++) ticks.AddMajor(i, Short(bars[i].Name));
        plot.Axes.Bottom.TickGenerator = ticks;
        plot.Axes.Bottom.TickLabelStyle.Rotation = 30;
        plot.Axes.Bottom.TickLabelStyle.Alignment = Alignment.MiddleLeft;
        plot.Axes.Bottom.TickLabelStyle.FontSize = 11;
        plot.Axes.Bottom.MinimumSize = 150;
        plot.Axes.Right.MinimumSize = 170; // the last rotated label runs past the last bar
        plot.Axes.Margins(bottom: 0, top: 0.15);
        plot.YLabel(yLabel);
        plot.Title(title, size: 13);
    }

    /// <summary>A bar's label: the system's name without the options' detail after the first parenthesis.</summary>
    private static string Short(string name) => name.Length > 38 ? name[..38] + "…" : name;
}
