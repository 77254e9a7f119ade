using System.Globalization;
using System.Text;

namespace LiveMig.Protocol;

/// <summary>
/// Text that came from a peer — Error texts, VM names, workload descriptions from a VM's state,
/// certificate names — made safe to log, print or put in a report: control characters (C0, DEL,
/// C1: newlines, ESC and so terminal escape sequences), Unicode format characters (bidirectional
/// overrides, zero-width characters) and line or paragraph separators become visible escapes
/// (<c>\n</c>, <c>\x1b</c>, <c>\u202e</c>). A peer can then neither start a forged line in a log
/// nor move the cursor or clear the screen. Escaped text has nothing left to escape, so escaping
/// twice changes nothing. The one helper for every place peer text is shown.
/// </summary>
public static class PeerText
{
    public static string Escape(string? text)
    {
        if (string.IsNullOrEmpty(text)) return text ?? "";
        if (!NeedsEscape(text)) return text;
        var sb = new StringBuilder(text.Length + 16);
        foreach (var rune in text.EnumerateRunes())
        {
            if (!Unsafe(rune)) { sb.Append(rune.ToString()); continue; }
            sb.Append(rune.Value switch
            {
                '\n' => @"\n",
                '\r' => @"\r",
                '\t' => @"\t",
                <= 0xFF => $@"\x{rune.Value:x2}",
                <= 0xFFFF => $@"\u{rune.Value:x4}",
                _ => $@"\U{rune.Value:x8}",
            });
        }
        return sb.ToString();
    }

    private static bool NeedsEscape(string text)
    {
        foreach (var rune in text.EnumerateRunes())
            if (Unsafe(rune)) return true;
        return false;
    }

    private static bool Unsafe(Rune r) => Rune.IsControl(r) || Rune.GetUnicodeCategory(r) is UnicodeCategory.Format or UnicodeCategory.LineSeparator or UnicodeCategory.ParagraphSeparator;
}
