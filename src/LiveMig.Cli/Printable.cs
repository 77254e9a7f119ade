using System.Globalization;
using System.Text;

namespace LiveMig.Cli;

/// <summary>
/// Text that came from a peer or a control socket (VM names from Hellos, error messages) made
/// safe to print: control characters, which could forge log lines or move the cursor, are shown
/// as escapes. (Branch <c>agent</c> brings the project-wide helper; this one goes then.)
/// </summary>
internal static class Printable
{
    public static string Escape(string? text)
    {
        if (string.IsNullOrEmpty(text)) return text ?? "";
        if (!text.Any(NeedsEscape)) return text;
        var sb = new StringBuilder(text.Length + 8);
        foreach (char c in text)
            sb.Append(NeedsEscape(c) ? (c <= 0xff ? $"\\x{(int)c:x2}" : $"\\u{(int)c:x4}") : c.ToString());
        return sb.ToString();
    }

    /// <summary>C0 and C1 controls, DEL, the bidirectional overrides (which reorder what a terminal shows), and the backslash (so an escape cannot be forged).</summary>
    private static bool NeedsEscape(char c) =>
        c == '\\' || char.GetUnicodeCategory(c) == UnicodeCategory.Control || c is >= '\u202a' and <= '\u202e' or >= '\u2066' and <= '\u2069';
}
