using System.Globalization;

namespace LiveMig;

/// <summary>Parsing and printing of sizes, rates and durations as people write them.</summary>
public static class Units
{
    private static readonly (string Suffix, long Factor)[] ByteSuffixes =
    [
        ("kib", 1L << 10), ("mib", 1L << 20), ("gib", 1L << 30), ("tib", 1L << 40),
        ("kb", 1000L), ("mb", 1000_000L), ("gb", 1000_000_000L), ("tb", 1000_000_000_000L),
        ("k", 1L << 10), ("m", 1L << 20), ("g", 1L << 30), ("t", 1L << 40), ("b", 1),
    ];

    public static bool TryParseBytes(string text, out long bytes)
    {
        bytes = 0;
        string s = text.Trim().ToLowerInvariant().Replace("_", "");
        long factor = 1;
        foreach (var (suffix, f) in ByteSuffixes)
            if (s.EndsWith(suffix, StringComparison.Ordinal)) { factor = f; s = s[..^suffix.Length].Trim(); break; }
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) || v < 0 || double.IsNaN(v)) return false;
        double r = v * factor;
        if (r > long.MaxValue) return false;
        bytes = (long)r;
        return true;
    }

    public static bool TryParseCount(string text, out long value)
    {
        value = 0;
        string s = text.Trim().ToLowerInvariant().Replace("_", "");
        long factor = 1;
        if (s.EndsWith('k')) { factor = 1000; s = s[..^1]; }
        else if (s.EndsWith('m')) { factor = 1000_000; s = s[..^1]; }
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) || double.IsNaN(v) || Math.Abs(v * factor) > long.MaxValue) return false;
        value = (long)(v * factor);
        return true;
    }

    /// <summary>Bytes per second from <c>100MiB/s</c>, <c>1Gbit</c>, <c>500Mbit/s</c>, <c>unlimited</c> (0).</summary>
    public static bool TryParseRate(string text, out long bytesPerSecond)
    {
        bytesPerSecond = 0;
        string s = text.Trim().ToLowerInvariant().Replace(" ", "");
        // Zero is refused in every unit rather than read as "unlimited": a cap computed as 0 must not lift the cap.
        if (s is "unlimited" or "none") return true;
        if (s.EndsWith("/s")) s = s[..^2];
        if (s.EndsWith("ps")) s = s[..^2];
        double bitFactor = 0;
        foreach (var (suffix, f) in new[] { ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0) })
            if (s.EndsWith(suffix, StringComparison.Ordinal)) { bitFactor = f; s = s[..^suffix.Length]; break; }
        if (bitFactor > 0)
        {
            if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double bits) || bits <= 0) return false;
            bytesPerSecond = (long)(bits * bitFactor / 8);
            return bytesPerSecond > 0;
        }
        return TryParseBytes(s, out bytesPerSecond) && bytesPerSecond > 0;
    }

    public static bool TryParseDuration(string text, out TimeSpan value)
    {
        value = default;
        string s = text.Trim().ToLowerInvariant();
        double scaleMs = 1000; // bare numbers are seconds
        foreach (var (suffix, f) in new[] { ("ms", 1.0), ("us", 0.001), ("s", 1000.0), ("m", 60_000.0) })
            if (s.EndsWith(suffix, StringComparison.Ordinal)) { scaleMs = f; s = s[..^suffix.Length]; break; }
        if (!double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) || v < 0 || double.IsNaN(v) || v * scaleMs > TimeSpan.MaxValue.TotalMilliseconds) return false;
        value = TimeSpan.FromMilliseconds(v * scaleMs);
        return true;
    }

    public static string Bytes(double b) => b switch
    {
        >= 1L << 30 => $"{b / (1L << 30):0.00} GiB",
        >= 1L << 20 => $"{b / (1L << 20):0.0} MiB",
        >= 1L << 10 => $"{b / (1L << 10):0.0} KiB",
        _ => $"{b:0} B",
    };

    public static string Rate(double bytesPerSecond) => bytesPerSecond <= 0 ? "-" : Bytes(bytesPerSecond) + "/s";
}
