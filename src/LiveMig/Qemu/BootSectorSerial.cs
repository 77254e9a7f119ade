using System.Globalization;

namespace LiveMig.Qemu;

/// <summary>The boot-sector guest's own report (guests/bootsector): passes made over its range and the stale or lost pages it found.</summary>
public readonly record struct BootSectorReport(long Passes, long Errors);

/// <summary>Reads the boot-sector guest's serial log: its banner, then "passes XXXXXXXX errors XXXXXXXX" lines (hexadecimal).</summary>
public static class BootSectorSerial
{
    public const string Banner = "livemig-bootsector";

    /// <summary>Whether the log is the boot-sector guest's (it printed its banner).</summary>
    public static bool IsBootSector(string log) => log.StartsWith(Banner, StringComparison.Ordinal);

    /// <summary>The last complete report line in <paramref name="log"/>, or null when there is none yet.</summary>
    public static BootSectorReport? Last(string log)
    {
        // Only complete lines: the guest may be writing the last one.
        int end = log.LastIndexOf('\n');
        while (end > 0)
        {
            int start = log.LastIndexOf('\n', end - 1) + 1;
            if (Parse(log.AsSpan(start, end - start)) is { } r) return r;
            end = start - 1;
        }
        return null;
    }

    /// <summary>One report line, or null when it is not one.</summary>
    public static BootSectorReport? Parse(ReadOnlySpan<char> line)
    {
        // "passes 0000abcd errors 00000000"
        if (line.Length != 31 || !line.StartsWith("passes ") || !line[15..].StartsWith(" errors ")) return null;
        if (!long.TryParse(line[7..15], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out long passes)) return null;
        if (!long.TryParse(line[23..31], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out long errors)) return null;
        return new BootSectorReport(passes, errors);
    }

    /// <summary>The log's text now (empty when it does not exist yet); it may end mid-line.</summary>
    public static string Read(string path)
    {
        try
        {
            using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            // The last 64 KiB are plenty for the last report; the banner is read separately.
            long from = Math.Max(0, f.Length - (64 << 10));
            var head = new byte[Banner.Length];
            int h = f.Read(head, 0, head.Length);
            f.Position = from;
            var buf = new byte[f.Length - from];
            int n = 0;
            while (n < buf.Length && f.Read(buf, n, buf.Length - n) is > 0 and var k) n += k;
            string tail = System.Text.Encoding.ASCII.GetString(buf, 0, n);
            string banner = System.Text.Encoding.ASCII.GetString(head, 0, h);
            return from == 0 ? tail : banner + "\n" + tail;
        }
        catch (FileNotFoundException) { return ""; }
        catch (DirectoryNotFoundException) { return ""; }
    }
}
