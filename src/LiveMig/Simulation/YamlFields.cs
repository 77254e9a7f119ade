using System.Globalization;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;

namespace LiveMig.Simulation;

/// <summary>A scenario file that cannot be used: one line, <c>FILE:LINE: FIELD: what is wrong</c>.</summary>
public sealed class ScenarioException(string message) : Exception(message);

/// <summary>The one YAML document of a scenario file (the simulator's and moving target defence's), or its error in one line.</summary>
internal static class ScenarioYaml
{
    /// <summary>The file's text, or a <see cref="ScenarioException"/> saying why it cannot be read.</summary>
    public static string ReadFile(string path)
    {
        try { return File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new ScenarioException($"{path}: cannot read it: {e.Message}"); }
    }

    /// <summary>The directory relative paths in <paramref name="path"/> are taken from.</summary>
    public static string DirectoryOf(string path) => Path.GetDirectoryName(Path.GetFullPath(path)) ?? ".";

    /// <summary>The root node of <paramref name="yaml"/>'s only document; <paramref name="file"/> names it in errors.</summary>
    public static YamlNode Root(string yaml, string file)
    {
        var stream = new YamlStream();
        try { stream.Load(new StringReader(yaml)); }
        catch (YamlException e)
        {
            string why = e.InnerException?.Message ?? e.Message;
            int cut = why.IndexOf("): ", StringComparison.Ordinal);
            throw new ScenarioException($"{file}:{e.Start.Line}: YAML: {(cut >= 0 ? why[(cut + 3)..] : why)}");
        }
        if (stream.Documents.Count != 1) throw new ScenarioException($"{file}:1: expected one YAML document, found {stream.Documents.Count}");
        return stream.Documents[0].RootNode;
    }
}

/// <summary>
/// Typed, checked reading of one YAML mapping of a scenario: every value read names its field
/// and line when it is wrong, and <see cref="CheckNoOthers"/> refuses fields nobody read (a typo
/// must not be ignored silently).
/// </summary>
internal sealed class YamlFields
{
    private readonly YamlMappingNode _node;
    private readonly HashSet<string> _read = [];

    public YamlFields(string file, string path, YamlNode node)
    {
        File = file;
        Path = path;
        if (node is not YamlMappingNode map) throw Fail(file, node, path, "expected a mapping of fields (name: value)");
        _node = map;
    }

    public string File { get; }
    public string Path { get; }
    public long Line => _node.Start.Line;
    public YamlMappingNode Node => _node;

    public static ScenarioException Fail(string file, YamlNode node, string field, string message) =>
        new($"{file}:{node.Start.Line}: {field}: {message}");

    public ScenarioException Fail(YamlNode node, string key, string message) => Fail(File, node, Field(key), message);

    public string Field(string key) => Path.Length == 0 ? key : $"{Path}.{key}";

    public bool Has(string key) => Find(key) is not null;

    public YamlNode? Get(string key)
    {
        _read.Add(key);
        return Find(key);
    }

    private YamlNode? Find(string key)
    {
        foreach (var (k, v) in _node.Children)
            if (k is YamlScalarNode s && s.Value == key) return v;
        return null;
    }

    public YamlNode Required(string key) => Get(key) ?? throw Fail(File, _node, Field(key), "missing (required)");

    public string Text(YamlNode node, string key)
    {
        if (node is not YamlScalarNode s || s.Value is null) throw Fail(node, key, "expected a single value");
        return s.Value;
    }

    public string? String(string key) => Get(key) is { } n ? Text(n, key) : null;

    public string RequiredString(string key) => Text(Required(key), key);

    public YamlFields? Map(string key) => Get(key) is { } n ? new YamlFields(File, Field(key), n) : null;

    public IReadOnlyList<YamlNode> List(string key)
    {
        var n = Get(key);
        if (n is null) return [];
        if (n is not YamlSequenceNode seq) throw Fail(n, key, "expected a list");
        return seq.Children.ToList();
    }

    /// <summary>A list of plain values, or one value alone.</summary>
    public IReadOnlyList<string> Strings(string key)
    {
        var n = Get(key);
        if (n is null) return [];
        if (n is YamlScalarNode) return [Text(n, key)];
        if (n is not YamlSequenceNode seq) throw Fail(n, key, "expected a value or a list of values");
        return seq.Children.Select(c => Text(c, key)).ToList();
    }

    public T? Parse<T>(string key, string expected, Func<string, T?> parse) where T : struct
    {
        var n = Get(key);
        if (n is null) return null;
        string text = Text(n, key);
        return parse(text) ?? throw Fail(n, key, $"expected {expected}, got '{Printable(text)}'");
    }

    public long? Bytes(string key, long min = 0) =>
        Parse(key, $"a size such as 4GiB{(min > 0 ? $" (at least {Units.Bytes(min)})" : "")}", t => Units.TryParseBytes(t, out long b) && b >= min ? b : (long?)null);

    public double? Rate(string key) => Parse(key, "a rate such as 1Gbit or 100MiB/s", t => Units.TryParseRate(t, out long r) && r > 0 ? r : (double?)null);

    public TimeSpan? Duration(string key) => Parse(key, "a duration such as 30s, 5ms, 2h or 7d", t => TryParseDuration(t, out var d) ? d : (TimeSpan?)null);

    /// <summary>The command line's durations (us, ms, s, m; bare: seconds), and hours and days (h, d), which scenarios spanning days need.</summary>
    public static bool TryParseDuration(string text, out TimeSpan value)
    {
        string s = text.Trim().ToLowerInvariant();
        foreach (var (suffix, hours) in new[] { ("h", 1.0), ("d", 24.0) })
        {
            if (!s.EndsWith(suffix, StringComparison.Ordinal)) continue;
            value = default;
            if (!double.TryParse(s[..^1], NumberStyles.Float, CultureInfo.InvariantCulture, out double v) || !(v >= 0) || v * hours > 24 * 365 * 100) return false;
            value = TimeSpan.FromHours(v * hours);
            return true;
        }
        return Units.TryParseDuration(s, out value);
    }

    public bool? Bool(string key) => Parse(key, "true or false", t => t.ToLowerInvariant() switch { "true" or "yes" or "on" => true, "false" or "no" or "off" => false, _ => (bool?)null });

    public double? Number(string key, double min, double max, string expected) =>
        Parse(key, expected, t => double.TryParse(t, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) && v >= min && v <= max ? v : TryCount(t, min, max));

    private static double? TryCount(string t, double min, double max) => Units.TryParseCount(t, out long v) && v >= min && v <= max ? v : null;

    public int? Int(string key, int min, int max) =>
        Parse(key, $"a whole number from {min} to {max}", t => int.TryParse(t, NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) && v >= min && v <= max ? v : (int?)null);

    /// <summary>A share, 0..1, as a number or a percentage (30%).</summary>
    public double? Fraction(string key) => Parse(key, "a share from 0 to 1, or a percentage such as 30%", ParseFraction);

    public static double? ParseFraction(string t)
    {
        t = t.Trim();
        bool percent = t.EndsWith('%');
        if (!double.TryParse(percent ? t[..^1] : t, NumberStyles.Float, CultureInfo.InvariantCulture, out double v)) return null;
        if (percent) v /= 100;
        return v is >= 0 and <= 1 ? v : null;
    }

    public T? Choice<T>(string key, params (string Name, T Value)[] choices) where T : struct
    {
        var n = Get(key);
        if (n is null) return null;
        string text = Text(n, key).Trim().ToLowerInvariant();
        foreach (var (name, value) in choices)
            if (name == text) return value;
        throw Fail(n, key, $"expected {string.Join(", ", choices.Select(c => c.Name))}; got '{Printable(text)}'");
    }

    /// <summary>Refuses every field not read (nor in <paramref name="alsoAllowed"/>), naming the first and what is expected.</summary>
    public void CheckNoOthers(IEnumerable<string>? alsoAllowed = null)
    {
        var allowed = new HashSet<string>(_read);
        if (alsoAllowed is not null) allowed.UnionWith(alsoAllowed);
        foreach (var (k, _) in _node.Children)
        {
            string name = k is YamlScalarNode s ? s.Value ?? "" : "?";
            if (!allowed.Contains(name))
                throw Fail(File, k, Field(Printable(name)), $"unknown field (expected one of: {string.Join(", ", allowed.Order(StringComparer.Ordinal))})");
        }
    }

    /// <summary>File text as it may be printed: control characters escaped, long values cut.</summary>
    public static string Printable(string s, int max = 80)
    {
        var sb = new System.Text.StringBuilder();
        foreach (char c in s.Length > max ? s[..max] + "…" : s)
            sb.Append(char.IsControl(c) ? $"\\x{(int)c:x2}" : c);
        return sb.ToString();
    }
}
