using LiveMig.Simulation;
using ScottPlot;

namespace LiveMig.Cli;

/// <summary>
/// The picture of <c>simulate --png</c>, drawn with ScottPlot (as <c>trace show</c> and
/// <c>mtd simulate</c>): above, a timeline with one bar a migration — the handshake, each
/// pre-copy round, the downtime (stop-and-copy or post-copy switch, marked with a triangle since it
/// is often too short to see) and the post-copy phase; below, each link's utilisation over time.
/// </summary>
internal static class SimulationPlots
{
    private const int Width = 1400, RowPixels = 22, MinTimelineHeight = 300, LinkHeight = 320;
    /// <summary>Rows drawn at most; the title says when there were more.</summary>
    public const int MaxRows = 120;

    private static readonly Color Handshake = Colors.Gray, RoundEven = new(0x1f, 0x77, 0xb4), RoundOdd = new(0x6b, 0xae, 0xd6),
        Downtime = new(0xd6, 0x27, 0x28), PostCopy = new(0xff, 0x7f, 0x0e);

    public static void Draw(SimulationResult result, string path)
    {
        var rows = result.Migrations.Where(m => m.Phases is { Count: > 0 }).Take(MaxRows).ToList();
        int timelineHeight = Math.Max(MinTimelineHeight, rows.Count * RowPixels + 120);
        var multiplot = new Multiplot();
        multiplot.AddPlots(2);
        Timeline(multiplot.GetPlot(0), result, rows);
        Links(multiplot.GetPlot(1), result);
        // The same margins on both, so their time axes line up.
        foreach (var p in new[] { multiplot.GetPlot(0), multiplot.GetPlot(1) })
        {
            p.Axes.Left.MinimumSize = 240;
        }
        // The layout stacks the two in equal rows: each as tall as the timeline needs.
        multiplot.SavePng(path, Width, 2 * Math.Max(timelineHeight, LinkHeight));
    }

    private static void Timeline(Plot plot, SimulationResult result, List<SimMigrationResult> rows)
    {
        double[] positions = new double[rows.Count];
        string[] labels = new string[rows.Count];
        for (int i = 0; i < rows.Count; i++)
        {
            var m = rows[i];
            double y = rows.Count - 1 - i; // the first migration on top
            positions[i] = y;
            labels[i] = $"{m.Vm} {m.From}→{m.To} ({m.Strategy})";
            foreach (var p in m.Phases!) Bar(plot, p, y);
            foreach (var p in m.Phases!.Where(p => p.Kind == "downtime"))
            {
                var mark = plot.Add.Marker(p.StartS, y + 0.42, MarkerShape.FilledTriangleDown, 9);
                mark.Color = Downtime;
            }
        }
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericManual(positions, labels);
        plot.Axes.Left.MajorTickStyle.Length = 0;
        plot.Grid.YAxisStyle.IsVisible = false;
        foreach (var (name, color) in new[] { ("handshake", Handshake), ("pre-copy round", RoundEven), ("downtime (▼)", Downtime), ("post-copy", PostCopy) })
            plot.Legend.ManualItems.Add(new LegendItem { LabelText = name, FillColor = color });
        // Horizontal, in a row of its own above the migrations.
        plot.Legend.Orientation = Orientation.Horizontal;
        plot.ShowLegend(Alignment.UpperCenter);
        int total = result.Migrations.Count(m => m.Phases is { Count: > 0 });
        plot.Title(total > rows.Count ? $"Migrations (the first {rows.Count} of {total} that ran)" : "Migrations");
        plot.XLabel("virtual time (s)");
        plot.Axes.SetLimits(0, Math.Max(result.EndS, 1e-3) * 1.01, -0.8, Math.Max(rows.Count, 1) + 0.9);
    }

    private static void Bar(Plot plot, SimPhase p, double y)
    {
        var color = p.Kind switch
        {
            "round" => p.Round % 2 == 0 ? RoundEven : RoundOdd,
            "downtime" => Downtime,
            "post-copy" => PostCopy,
            _ => Handshake,
        };
        var r = plot.Add.Rectangle(p.StartS, Math.Max(p.EndS, p.StartS), y - 0.35, y + 0.35);
        r.FillColor = color;
        r.LineWidth = 0;
    }

    private static void Links(Plot plot, SimulationResult result)
    {
        var palette = new ScottPlot.Palettes.Category10();
        int i = 0;
        foreach (var l in result.Links)
        {
            if (l.Rates is not { Count: > 0 } rates) continue;
            // Each point holds until the next one; the last one until the end of the run.
            double[] xs = [.. rates.Select(r => r.AtS), Math.Max(result.EndS, rates[^1].AtS)];
            double[] ys = [.. rates.Select(r => r.BytesPerSecond / l.BytesPerSecond * 100), rates[^1].BytesPerSecond / l.BytesPerSecond * 100];
            var s = plot.Add.Scatter(xs, ys);
            s.ConnectStyle = ConnectStyle.StepHorizontal;
            s.MarkerSize = 0;
            s.LineWidth = 1.5f;
            s.Color = palette.GetColor(i++);
            s.LegendText = $"{l.Name} ({Units.Rate(l.BytesPerSecond)}, mean {l.Utilisation * 100:0.#}%)";
        }
        plot.Legend.Orientation = Orientation.Horizontal;
        plot.ShowLegend(Alignment.UpperCenter);
        plot.Title("Link utilisation");
        plot.XLabel("virtual time (s)");
        plot.YLabel("% of the link's bandwidth");
        plot.Axes.SetLimits(0, Math.Max(result.EndS, 1e-3) * 1.01, -2, 125); // headroom for the legend
    }
}
