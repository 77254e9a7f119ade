using LiveMig.Traces;
using ScottPlot;

namespace LiveMig.Cli;

/// <summary>The pictures of <c>trace show --png</c>, drawn with ScottPlot.</summary>
internal static class TracePlots
{
    private const int Width = 1200, Height = 600;
    private const int MaxColumns = 600, MaxRows = 300;

    public static List<string> Draw(TraceStats s, string dir)
    {
        Directory.CreateDirectory(dir);
        var files = new List<string> { Path.Combine(dir, "heatmap.png"), Path.Combine(dir, "dirty-rate.png"), Path.Combine(dir, "wws.png") };
        HeatMap(s).SavePng(files[0], Width, Height);
        DirtyRate(s).SavePng(files[1], Width, Height / 4 * 3);
        WorkingSets(s).SavePng(files[2], Width, Height / 4 * 3);
        return files;
    }

    private static string Title(TraceStats s)
    {
        string src = TraceCommands.Printable(s.Trace.Header.Source);
        return src.Length > 70 ? src[..67] + "..." : src;
    }

    /// <summary>Pages (rows, in MiB of the page space) by time (columns): the share of a cell's pages written in the interval under way then.</summary>
    private static Plot HeatMap(TraceStats s)
    {
        var t = s.Trace;
        var ivs = t.Intervals.Skip(1).ToArray();
        double duration = Math.Max(t.End.Duration.TotalSeconds, 1e-3);
        int space = Math.Max(t.End.PageSpace, 1);
        int cols = Math.Clamp(ivs.Length, 1, MaxColumns), rows = Math.Clamp(space, 1, MaxRows);
        double pagesPerRow = (double)space / rows;
        var cells = new double[rows, cols];
        var perRow = new double[rows];
        for (int c = 0; c < cols; c++) for (int r = 0; r < rows; r++) cells[r, c] = double.NaN;
        foreach (var iv in ivs)
        {
            Array.Clear(perRow);
            foreach (int p in iv.Pages) perRow[Math.Min(rows - 1, (int)(p / pagesPerRow))] += 1;
            // The interval covers the columns of its time span (a long interval, several).
            int c0 = Math.Min(cols - 1, (int)(iv.Start.TotalSeconds / duration * cols));
            int c1 = Math.Clamp((int)Math.Ceiling((iv.Start + iv.Duration).TotalSeconds / duration * cols) - 1, c0, cols - 1);
            int inUse = Math.Min(rows, (int)Math.Ceiling(iv.PageSpace / pagesPerRow)); // rows above: not in use yet (left blank)
            for (int c = c0; c <= c1; c++)
                for (int r = 0; r < inUse; r++)
                    cells[rows - 1 - r, c] = Math.Max(double.IsNaN(cells[rows - 1 - r, c]) ? 0 : cells[rows - 1 - r, c], perRow[r] / pagesPerRow);
        }
        var plot = new Plot();
        var hm = plot.Add.Heatmap(cells);
        hm.Colormap = new ScottPlot.Colormaps.Turbo();
        double mib = space * 4096.0 / (1 << 20);
        hm.Extent = new CoordinateRect(0, duration, 0, mib);
        plot.Add.ColorBar(hm); // its label would overlap the tick labels: the title says what the colour is
        plot.Axes.SetLimits(0, duration, 0, mib);
        plot.Title($"Share of pages written per interval (blank: not in use yet): {Title(s)}");
        plot.XLabel("time (s)");
        plot.YLabel("page space (MiB, in order of first use)");
        return plot;
    }

    private static Plot DirtyRate(TraceStats s)
    {
        var plot = new Plot();
        var rate = s.DirtyRate.Select(r => r * 4096 / (1 << 20)).ToArray();
        var line = plot.Add.Scatter(s.IntervalStartSeconds, rate);
        line.MarkerSize = 0;
        line.LineWidth = 1.5f;
        plot.Title($"Dirty rate: {Title(s)}");
        plot.XLabel("time (s)");
        plot.YLabel("pages changed (MiB/s)");
        plot.Axes.SetLimits(0, Math.Max(s.Trace.End.Duration.TotalSeconds, 1e-3), 0, Math.Max(rate.DefaultIfEmpty(0).Max() * 1.1, 0.01));
        return plot;
    }

    /// <summary>Clark et al.'s picture: distinct pages written within windows of several lengths, over time.</summary>
    private static Plot WorkingSets(TraceStats s)
    {
        var plot = new Plot();
        var palette = new ScottPlot.Palettes.Category10();
        double max = 0;
        for (int i = 0; i < s.WorkingSets.Count; i++)
        {
            var w = s.WorkingSets[i];
            if (w.Pages.Length == 0) continue;
            var mib = w.Pages.Select(p => p * 4096.0 / (1 << 20)).ToArray();
            max = Math.Max(max, mib.Max());
            var line = plot.Add.Scatter(w.StartSeconds, mib);
            line.MarkerSize = 0;
            line.LineWidth = 1.5f;
            line.Color = palette.GetColor(i);
            line.LegendText = $"{TraceShow.Window(w.Window)} window (mean {w.MeanPages * 4096 / (1 << 20):0.0} MiB)";
        }
        plot.ShowLegend(Alignment.UpperLeft); // the long windows run high on the right
        plot.Title($"Writable working set: {Title(s)}");
        plot.XLabel("window start (s)");
        plot.YLabel("distinct pages written in the window (MiB)");
        plot.Axes.SetLimits(0, Math.Max(s.Trace.End.Duration.TotalSeconds, 1e-3), 0, Math.Max(max * 1.25, 0.01));
        return plot;
    }
}
