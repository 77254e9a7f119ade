using System.Globalization;
using LiveMig.Memory;

namespace LiveMig.Workloads;

/// <summary>
/// A workload name with its parameters, written <c>NAME[:key=value,key=value]</c>, e.g.
/// <c>hotcold:rate=50000,wss=25%</c>. It travels inside the VM state, so the destination
/// rebuilds the same workload.
/// </summary>
public sealed class WorkloadSpec
{
    private readonly Dictionary<string, string> _params;

    private WorkloadSpec(string name, Dictionary<string, string> parameters)
    {
        Name = name;
        _params = parameters;
    }

    public string Name { get; }
    public IReadOnlyDictionary<string, string> Parameters => _params;

    public static WorkloadSpec Parse(string text)
    {
        if (string.IsNullOrWhiteSpace(text)) throw new FormatException("empty workload");
        int colon = text.IndexOf(':');
        string name = (colon < 0 ? text : text[..colon]).Trim().ToLowerInvariant();
        var p = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
        if (colon >= 0)
        {
            foreach (string part in text[(colon + 1)..].Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                int eq = part.IndexOf('=');
                // trace:FILE — the one workload whose first parameter may go without its name.
                if (eq < 0 && name == "trace" && p.Count == 0) { p["file"] = part; continue; }
                if (eq <= 0) throw new FormatException($"workload parameter '{part}' is not key=value");
                p[part[..eq].Trim()] = part[(eq + 1)..].Trim();
            }
        }
        return new WorkloadSpec(name, p);
    }

    public override string ToString() =>
        _params.Count == 0 ? Name : Name + ":" + string.Join(',', _params.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => $"{kv.Key}={kv.Value}"));

    /// <summary>Rejects parameters the workload does not know, naming them.</summary>
    public void CheckKnown(params string[] known)
    {
        foreach (string k in _params.Keys)
            if (!known.Contains(k, StringComparer.OrdinalIgnoreCase))
                throw new FormatException($"workload '{Name}' has no parameter '{k}' (known: {(known.Length == 0 ? "none" : string.Join(", ", known))})");
    }

    public double Double(string key, double fallback, double min, double max)
    {
        if (!_params.TryGetValue(key, out string? s)) return fallback;
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) || v < min || v > max)
            throw new FormatException($"workload '{Name}' parameter {key}={s}: expected a number in [{min}, {max}]");
        return v;
    }

    public long Long(string key, long fallback, long min, long max)
    {
        if (!_params.TryGetValue(key, out string? s)) return fallback;
        if (!Units.TryParseCount(s, out long v) || v < min || v > max)
            throw new FormatException($"workload '{Name}' parameter {key}={s}: expected a whole number in [{min}, {max}]");
        return v;
    }

    /// <summary>A page count given as bytes (<c>64MiB</c>) or as a share of memory (<c>25%</c>).</summary>
    public long Pages(string key, long fallbackPages, long memoryPages)
    {
        if (!_params.TryGetValue(key, out string? s)) return fallbackPages;
        long pages;
        if (s.EndsWith('%') && double.TryParse(s[..^1], NumberStyles.Float, CultureInfo.InvariantCulture, out double pct) && pct > 0 && pct <= 100)
            pages = (long)(memoryPages * pct / 100);
        else if (Units.TryParseBytes(s, out long bytes) && bytes > 0)
            pages = bytes / GuestMemory.PageSize;
        else throw new FormatException($"workload '{Name}' parameter {key}={s}: expected a size (64MiB) or a share of memory (25%)");
        if (pages < 1 || pages > memoryPages)
            throw new FormatException($"workload '{Name}' parameter {key}={s}: must be between one page and the VM's memory");
        return pages;
    }
}
