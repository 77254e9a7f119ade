using LiveMig.Mtd;
using ScottPlot;

namespace LiveMig.Cli;

/// <summary>The picture of <c>mtd simulate --png</c>: security against cost, one point per configuration, the Pareto front joined.</summary>
internal static class MtdPlots
{
    private const int Width = 1200, Height = 750;

    public static void Draw(MtdResult result, string path)
    {
        var axis = Enum.Parse<CostMetric>(result.ParetoCost, ignoreCase: true);
        var plot = new Plot();
        var palette = new ScottPlot.Palettes.Category10();
        var kinds = result.Configurations.Select(c => c.Kind).Distinct().ToList();
        double maxX = 0;
        foreach (var (kind, i) in kinds.Select((k, i) => (k, i)))
        {
            var points = result.Configurations.Where(c => c.Kind == kind).ToList();
            double[] xs = [.. points.Select(c => c.Cost(axis) / Scale(axis))], ys = [.. points.Select(c => c.SuccessProbability)];
            maxX = Math.Max(maxX, xs.DefaultIfEmpty(0).Max());
            var s = plot.Add.ScatterPoints(xs, ys);
            s.MarkerSize = 9;
            s.Color = palette.GetColor(i);
            s.LegendText = kind;
            foreach (var c in points)
            {
                // The 95% interval of the success probability, as a vertical bar.
                var bar = plot.Add.Line(c.Cost(axis) / Scale(axis), c.SuccessLow, c.Cost(axis) / Scale(axis), c.SuccessHigh);
                bar.Color = palette.GetColor(i).WithAlpha(0.5);
                bar.LineWidth = 1;
                var label = plot.Add.Text(c.Policy.Replace(kind, "").Replace("→ ", "").Trim(), c.Cost(axis) / Scale(axis), c.SuccessProbability);
                label.LabelFontSize = 10;
                label.LabelFontColor = palette.GetColor(i);
                label.OffsetX = 6;
                label.OffsetY = -6;
            }
        }
        var front = result.Configurations.Where(c => c.Pareto).OrderBy(c => c.Cost(axis)).ToList();
        if (front.Count > 1)
        {
            var line = plot.Add.Scatter(front.Select(c => c.Cost(axis) / Scale(axis)).ToArray(), front.Select(c => c.SuccessProbability).ToArray());
            line.MarkerSize = 0;
            line.LineWidth = 2;
            line.LinePattern = LinePattern.Dashed;
            line.Color = Colors.Black;
            line.ConnectStyle = ConnectStyle.StepHorizontal;
            line.LegendText = "Pareto front";
        }
        plot.ShowLegend(Alignment.UpperRight);
        plot.Title($"Moving target defence: attack success within {result.HorizonH:0.#} h (attack needs {result.AttackTimeH:0.##} h) against cost, {result.Runs} runs each");
        plot.XLabel(AxisLabel(axis));
        plot.YLabel("probability of attack success");
        plot.Axes.SetLimits(-maxX * 0.03, Math.Max(maxX * 1.2, 1e-9), -0.03, 1.05);
        plot.SavePng(path, Width, Height);
    }

    private static double Scale(CostMetric m) => m == CostMetric.Bytes ? 1 << 30 : 1;

    private static string AxisLabel(CostMetric m) => m switch
    {
        CostMetric.Migrations => "migrations per hour",
        CostMetric.Bytes => "GiB migrated per hour",
        CostMetric.Downtime => "downtime per hour (ms)",
        _ => "application degradation per hour (s of its work)",
    };
}
