using System.Globalization;
using LiveMig.Protocol;
using LiveMig.Reporting;
using Spectre.Console;

namespace LiveMig.Cli;

/// <summary><c>livemig list</c> and <c>livemig status</c> as tables for people (the JSON forms are <see cref="AgentListing.ToJson"/> and <see cref="MigrationStatus.ToJson"/>).</summary>
internal static class StatusView
{
    public static void RenderList(AgentListing l, IAnsiConsole console, DateTimeOffset now)
    {
        Widen(console);
        if (l.Vms.Count == 0) console.WriteLine("no VMs");
        else
        {
            var vms = new Table().Border(TableBorder.Simple);
            foreach (string c in new[] { "VM", "kind", "memory", "vCPUs", "state", "since", "arrived by", "workload" }) vms.AddColumn(c);
            foreach (var v in l.Vms)
                vms.AddRow(Cells(v.Name, v.Kind, Units.Bytes(v.MemoryBytes), v.Vcpus.ToString(CultureInfo.InvariantCulture),
                    v.LeavingBy is null ? v.State : $"{v.State} ({v.LeavingBy})", Since(v.Since, now), v.ArrivedBy ?? "started here", v.Workload));
            console.Write(vms);
        }
        if (l.Migrations.Count == 0) { console.WriteLine("no migrations in progress"); return; }
        var ms = new Table().Border(TableBorder.Simple);
        foreach (string c in new[] { "migration", "role", "strategy", "VM", "peer", "phase", "round", "since" }) ms.AddColumn(c);
        foreach (var m in l.Migrations)
            ms.AddRow(Cells(m.MigrationId, m.Role, m.Strategy, m.VmName, m.Peer.Length > 0 ? m.Peer : "-", m.Phase, Round(m.Round), Since(m.StartedAt, now)));
        console.Write(ms);
    }

    /// <summary>One migration's live figures, as QEMU's <c>info migrate</c> lists them.</summary>
    public static void RenderStatus(MigrationStatus s, IAnsiConsole console)
    {
        Widen(console);
        var t = new Table().Border(TableBorder.Rounded).Title(Markup.Escape($"migration {s.MigrationId} ({s.Role})"));
        t.AddColumn("what").AddColumn("value");
        void Row(string k, string v) => t.AddRow(Markup.Escape(k), Markup.Escape(v));
        Row("VM", $"{PeerText.Escape(s.VmName)} ({Units.Bytes(s.MemoryBytes)})");
        Row("strategy", s.Strategy);
        if (s.Peer.Length > 0) Row(s.Role == "source" ? "destination" : "source", PeerText.Escape(s.Peer));
        Row("phase", PeerText.Escape(s.Phase));
        Row("round", Round(s.Round));
        Row("pages remaining", s.PagesRemaining < 0 ? "unknown" : s.PagesRemaining.ToString("N0", CultureInfo.InvariantCulture));
        Row("dirty rate", $"{s.DirtyRatePagesPerSecond:N0} pages/s");
        Row("bandwidth", Units.Rate(s.BandwidthBytesPerSecond) + (s.BandwidthLimitBytesPerSecond > 0 ? $" (cap {Units.Rate(s.BandwidthLimitBytesPerSecond)})" : ""));
        Row("expected downtime", s.ExpectedDowntimeMs < 0 ? "unknown (no round completed yet)" : $"{s.ExpectedDowntimeMs:0.0} ms");
        Row("transferred", $"{Units.Bytes(s.BytesTransferred)}, {s.PagesTransferred:N0} pages");
        Row("elapsed", $"{s.ElapsedMs / 1000:0.0} s (since {s.StartedAt.ToLocalTime():HH:mm:ss})");
        console.Write(t);
    }

    /// <summary>Piped into a file or another program, a table keeps its rows whole (migration IDs unbroken) instead of wrapping at 80 columns.</summary>
    private static void Widen(IAnsiConsole console)
    {
        if (Console.IsOutputRedirected) console.Profile.Width = Math.Max(console.Profile.Width, 200);
    }

    private static string Round(int round) => round < 0 ? "-" : round.ToString(CultureInfo.InvariantCulture);

    /// <summary>"21:58:36 (3m 12s ago)".</summary>
    internal static string Since(DateTimeOffset at, DateTimeOffset now)
    {
        var ago = now - at;
        if (ago < TimeSpan.Zero) ago = TimeSpan.Zero;
        string span = ago.TotalHours >= 1 ? $"{(int)ago.TotalHours}h {ago.Minutes}m" : ago.TotalMinutes >= 1 ? $"{ago.Minutes}m {ago.Seconds}s" : $"{ago.TotalSeconds:0}s";
        return $"{at.ToLocalTime():HH:mm:ss} ({span} ago)";
    }

    /// <summary>Cells for a row: peer text escaped, then Spectre markup escaped.</summary>
    private static string[] Cells(params string[] values) => [.. values.Select(v => Markup.Escape(PeerText.Escape(v)))];
}
