using System.Globalization;

namespace LiveMig.Bench;

internal static class Stats
{
    public static double Median(IEnumerable<double> values)
    {
        var v = values.OrderBy(x => x).ToArray();
        if (v.Length == 0) return double.NaN;
        return v.Length % 2 == 1 ? v[v.Length / 2] : (v[v.Length / 2 - 1] + v[v.Length / 2]) / 2;
    }

    public static string F(double v, string format = "0.00") => double.IsNaN(v) ? "-" : v.ToString(format, CultureInfo.InvariantCulture);

    /// <summary>"median (min–max)" for a column that varies between repetitions.</summary>
    public static string Spread(IReadOnlyCollection<double> v, string format = "0")
        => v.Count <= 1 ? F(Median(v), format) : $"{F(Median(v), format)} ({F(v.Min(), format)}–{F(v.Max(), format)})";

    /// <summary>The most frequent value; ties and minorities shown as "a ×2, b".</summary>
    public static string Mode(IEnumerable<string> values)
    {
        var groups = values.GroupBy(s => s).OrderByDescending(g => g.Count()).ToList();
        if (groups.Count == 1) return groups[0].Key;
        return string.Join(", ", groups.Select(g => g.Count() > 1 ? $"{g.Key} ×{g.Count()}" : g.Key));
    }

    public static double GB(double bytes) => bytes / 1e9;
}
