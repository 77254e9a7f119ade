using System.CommandLine;
using System.Text.Json;
using LiveMig.Traces;

namespace LiveMig.Cli;

/// <summary><c>livemig trace show FILE [--png DIR] [--json]</c>.</summary>
internal static class TraceShow
{
    public static Command Command()
    {
        var file = new Argument<string>("FILE") { Description = "A trace written by 'livemig trace record'." };
        var png = new Option<string?>("--png") { Description = "Also draw heatmap.png (page x time), dirty-rate.png and wws.png into this directory.", HelpName = "DIR" };
        var json = new Option<bool>("--json") { Description = "Print the description as one JSON object on stdout." };
        var show = new Command("show", "Describes a trace: size, duration, dirty rate over time, writable working set (distinct pages written per window, for several window lengths), and the share of zero, compressible and duplicate pages.") { file, png, json };
        show.SetAction(r => TraceCommands.Guard(() =>
        {
            string path = r.GetValue(file)!;
            if (!File.Exists(path)) throw new UsageException($"FILE '{TraceCommands.Printable(path)}': no such file");
            var stats = TraceStats.Of(TraceFile.Load(path));
            long size = new FileInfo(path).Length;
            if (r.GetValue(json)) WriteJson(Console.OpenStandardOutput(), stats, size);
            else WriteText(Console.Out, stats, path, size);
            if (r.GetValue(png) is { } dir)
                foreach (string f in TracePlots.Draw(stats, dir)) Console.Error.WriteLine($"wrote {TraceCommands.Printable(f)}");
            return 0;
        }));
        return show;
    }

    private static string Pct(double share) => $"{share * 100:0.#}%";

    private static string Mix(ContentMix m) =>
        $"{Pct(m.Zero)} zero, {Pct(m.Compressible)} compressible, {Pct(m.Incompressible)} incompressible, {Pct(m.Duplicate)} duplicate";

    private static void WriteText(TextWriter o, TraceStats s, string path, long size)
    {
        var t = s.Trace;
        var end = t.End.Reason == TraceEndReason.TargetExited ? $"the target exited ({TraceCommands.Printable(t.End.Note)})" : "completed";
        o.WriteLine($"{TraceCommands.Printable(path)}: {Units.Bytes(size)}, recorded {t.Header.Started.UtcDateTime:yyyy-MM-dd HH:mm} UTC from: {TraceCommands.Printable(t.Header.Source)}");
        o.WriteLine($"duration {t.End.Duration.TotalSeconds:0.0} s in {t.End.Intervals - 1} intervals (aimed at {t.Header.NominalInterval.TotalMilliseconds:0} ms); {end}");
        o.WriteLine($"page space {t.End.PageSpace:N0} pages ({Units.Bytes(t.End.PageSpace * 4096.0)}); initial image {s.InitialImage.Pages:N0} pages: {Mix(s.InitialImage)}");
        double mean = t.End.Duration > TimeSpan.Zero ? s.Writes.Pages / t.End.Duration.TotalSeconds : 0;
        double peak = s.DirtyRate.DefaultIfEmpty(0).Max();
        o.WriteLine($"page writes after the image: {s.Writes.Pages:N0} ({mean:N0} pages/s = {Units.Rate(mean * 4096)} mean, {peak:N0} pages/s peak in an interval)");
        o.WriteLine($"  content written: {Mix(s.Writes)}; bytes changed per write: median {s.MedianBytesChanged:0}, mean {s.MeanBytesChanged:0} of 4096");
        o.WriteLine("writable working set (distinct pages written within a window):");
        o.WriteLine("  window      mean          max");
        foreach (var w in s.WorkingSets)
            o.WriteLine($"  {Window(w.Window),-8}  {Units.Bytes(w.MeanPages * 4096),-12}  {Units.Bytes(w.MaxPages * 4096.0)}");
    }

    internal static string Window(TimeSpan w) => w < TimeSpan.FromSeconds(1) ? $"{w.TotalMilliseconds:0} ms" : $"{w.TotalSeconds:0.#} s";

    private static void WriteJson(Stream output, TraceStats s, long size)
    {
        var t = s.Trace;
        using var j = new Utf8JsonWriter(output, new JsonWriterOptions { Indented = false });
        j.WriteStartObject();
        j.WriteNumber("formatVersion", 1);
        j.WriteNumber("fileBytes", size);
        j.WriteString("source", t.Header.Source);
        j.WriteString("started", t.Header.Started);
        j.WriteNumber("durationSeconds", t.End.Duration.TotalSeconds);
        j.WriteNumber("intervals", t.End.Intervals - 1);
        j.WriteNumber("nominalIntervalMs", t.Header.NominalInterval.TotalMilliseconds);
        j.WriteString("end", t.End.Reason == TraceEndReason.TargetExited ? "targetExited" : "completed");
        j.WriteString("endNote", t.End.Note);
        j.WriteNumber("pageSpace", t.End.PageSpace);
        MixJson(j, "initialImage", s.InitialImage);
        MixJson(j, "writes", s.Writes);
        j.WriteNumber("medianBytesChanged", s.MedianBytesChanged);
        j.WriteNumber("meanBytesChanged", s.MeanBytesChanged);
        j.WriteStartArray("dirtyRate");
        for (int i = 0; i < s.DirtyRate.Length; i++)
        {
            j.WriteStartObject();
            j.WriteNumber("startSeconds", Math.Round(s.IntervalStartSeconds[i], 4));
            j.WriteNumber("pagesPerSecond", Math.Round(s.DirtyRate[i], 1));
            j.WriteEndObject();
        }
        j.WriteEndArray();
        j.WriteStartArray("writableWorkingSet");
        foreach (var w in s.WorkingSets)
        {
            j.WriteStartObject();
            j.WriteNumber("windowSeconds", w.Window.TotalSeconds);
            j.WriteNumber("meanPages", Math.Round(w.MeanPages, 1));
            j.WriteNumber("maxPages", w.MaxPages);
            j.WriteEndObject();
        }
        j.WriteEndArray();
        j.WriteEndObject();
        j.Flush();
        output.WriteByte((byte)'\n');
        output.Flush();
    }

    private static void MixJson(Utf8JsonWriter j, string name, ContentMix m)
    {
        j.WriteStartObject(name);
        j.WriteNumber("pages", m.Pages);
        j.WriteNumber("zero", Math.Round(m.Zero, 4));
        j.WriteNumber("compressible", Math.Round(m.Compressible, 4));
        j.WriteNumber("incompressible", Math.Round(m.Incompressible, 4));
        j.WriteNumber("duplicate", Math.Round(m.Duplicate, 4));
        j.WriteEndObject();
    }
}
