using System.Globalization;
using LiveMig.Engine;
using LiveMig.Reporting;
using Spectre.Console;

namespace LiveMig.Cli;

/// <summary>The report as tables for people (the JSON form is <see cref="MigrationReport.ToJson"/>).</summary>
internal static class ReportView
{
    public static void Render(MigrationReport r, IAnsiConsole console)
    {
        var summary = new Table().Border(TableBorder.Rounded).Title($"[bold]{Markup.Escape(r.Strategy)} migration of {Shown(r.VmName)} ({Markup.Escape(r.Role)} report)[/]");
        summary.AddColumn("what").AddColumn(new TableColumn("value"));
        void Row(string k, string v) => summary.AddRow(Markup.Escape(k), Shown(v)); // every value: some come from the peer
        // The destination cannot know the source's settings and estimates (docs/report.md): its table leaves them out rather than show zeros.
        bool source = r.Role == "source";
        Row("outcome", r.Outcome + (r.Error is null ? "" : ": " + r.Error));
        if (!source && r.Peer is not null) Row("source", $"{r.Peer} ({r.Security})");
        Row("guest", $"{Units.Bytes(r.MemoryBytes)}, {r.Vcpus} vCPUs, workload {r.Workload}, dirty log {r.DirtyLog}");
        Row("total migration time", $"{r.TotalTimeMs:0.0} ms");
        Row("downtime", $"{r.DowntimeMs:0.0} ms (of which verification {r.VerifyMs:0.0} ms{(source ? $"; limit {r.DowntimeLimitMs:0} ms" : "")})");
        if (r.Client is { } c)
            Row("downtime seen by the kv client", $"{c.ObservedDowntimeMs:0.0} ms (requests {c.Requests}, errors {c.Errors}, wrong answers {c.Mismatches}, p50 {c.P50Us:0} µs, p99 {c.P99Us:0} µs, max {c.MaxUs / 1000:0.0} ms)");
        Row("bytes on the wire", $"{Units.Bytes(r.BytesOnWire)} (page data {Units.Bytes(r.Bytes.PageData)}, zero markers {Units.Bytes(r.Bytes.ZeroMarkers)}, VM state {Units.Bytes(r.Bytes.VmState)}, protocol {Units.Bytes(r.Bytes.Protocol)})");
        Row("pages by encoding", string.Join(", ", r.PagesByEncoding.Where(kv => kv.Value > 0 || kv.Key is "raw" or "zero").Select(kv => $"{kv.Key} {kv.Value}")));
        if (r.Pipeline != "none") Row("pipeline", r.Pipeline);
        if (r.Streams > 1) Row("data streams", $"{r.Streams} TCP connections beside the control connection");
        foreach (var (name, st) in r.Stages)
        {
            string extra = string.Join(", ", st.Counters.Where(kv => kv.Value != 0).Select(kv => $"{kv.Key} {kv.Value}"));
            Row($"stage {name}", $"{st.PagesEncoded:N0} of {st.PagesOffered:N0} pages, saved {Units.Bytes(st.BytesSaved)} ({Units.Bytes(st.BytesIn)} → {Units.Bytes(st.BytesOut)}), {st.CpuMs:0.0} ms" + (extra.Length > 0 ? $"; {extra}" : ""));
        }
        if (r.Strategy == "precopy" && r.PagesPushed + r.PagesRequested == 0) Row("stop condition", source ? $"{r.StopReason} (estimated downtime {r.EstimatedDowntimeMs:0.0} ms)" : $"{r.StopReason} (as the source said)");
        else
        {
            Row("switch to post-copy", $"{r.StopReason}; VM running on the destination after {r.TimeToResumeMs:0.0} ms, last page {r.PostCopyMs:0.0} ms later");
            Row("post-copy pages", $"pushed {r.PagesPushed:N0} (prepaged {r.PagesPrepaged:N0}), requested {r.PagesRequested:N0}{(r.PagesResent > 0 ? $" (and {r.PagesResent:N0} resent: requested while their push was on its way)" : "")}; demand paging {r.DemandPaging ?? "-"}; connection failures survived {r.NetworkFaults}");
            if (r.FaultLatencyUs is { } f) Row("vCPU faults on missing pages", $"{r.Faults:N0}: p50 {f.P50:0} µs, p99 {f.P99:0} µs, max {f.Max:0} µs");
            if (r.ClientPhases is { } cp)
                Row("kv client before / during / after", string.Join(" / ", new[] { cp.Before, cp.During, cp.After }.Select(c => c is null ? "-" : $"p99 {c.P99Us:0} µs max {c.MaxUs / 1000:0.0} ms ({c.Requests} req)")));
        }
        if (source) Row("bandwidth limit", r.BandwidthLimitBytesPerSecond > 0 ? Units.Rate(r.BandwidthLimitBytesPerSecond) : "unlimited");
        if (r.ConvergenceAids.Count > 0) Row("convergence aids", string.Join(", ", r.ConvergenceAids));
        if (r.PagesSkipped > 0 || r.PagesDeferred > 0) Row("pages not re-sent", $"{r.PagesSkipped:N0} skipped (written again since harvest); {r.PagesDeferred:N0} hot pages kept for the stop-and-copy");
        if (r.Throttle > 0 || r.DirtyLimit > 0)
        {
            string how = string.Join(" and ", new[] { r.Throttle > 0 ? $"throttle up to {r.Throttle * 100:0}%" : null, r.DirtyLimit > 0 ? $"dirty limit {r.DirtyLimit:N0} pages/s per vCPU" : null }.OfType<string>());
            string cost = r.OpsPerSecondBeforeThrottle is { } before && r.OpsPerSecondThrottled is { } during
                ? $"; guest {before:N0} ops/s before, {during:N0} while slowed, {r.OperationsLost:N0} operations lost" : "";
            Row("guest slowed", $"{how} for {r.ThrottledMs:0} ms{cost}");
        }
        if (r.DowntimeExceededMs is { } over) Row("downtime limit exceeded", $"by {over:0.0} ms (accepted with --on-stall pause)");
        foreach (string step in r.Escalations) Row("escalation", step);
        Row("verified", r.Verified switch { true => $"yes (xxHash3 {r.SourceHash})", false => "NO: memory differs", null => "not asked" });
        console.Write(summary);

        if (r.Rounds.Count == 0) return;
        var rounds = new Table().Border(TableBorder.Simple);
        rounds.AddColumn("round").AddColumn(new TableColumn("pages sent").RightAligned()).AddColumn(new TableColumn("dirtied meanwhile").RightAligned())
            .AddColumn(new TableColumn("bytes").RightAligned()).AddColumn(new TableColumn("time").RightAligned()).AddColumn(new TableColumn("bandwidth").RightAligned())
            .AddColumn(new TableColumn("dirty rate").RightAligned());
        bool held = r.Rounds.Any(x => x.PagesSkipped > 0 || x.PagesDeferred > 0), slowed = r.Rounds.Any(x => x.Throttle > 0 || x.DirtyLimit > 0);
        if (held) rounds.AddColumn(new TableColumn("skip").RightAligned()).AddColumn(new TableColumn("defer").RightAligned());
        if (slowed) rounds.AddColumn(new TableColumn("slowed").RightAligned());
        foreach (var x in r.Rounds)
        {
            var cells = new List<string>
            {
                x.Final ? $"{x.Round} (stop-and-copy)" : x.Round.ToString(CultureInfo.InvariantCulture), x.PagesSent.ToString("N0", CultureInfo.InvariantCulture),
                x.Final ? "-" : x.PagesDirtied.ToString("N0", CultureInfo.InvariantCulture), Units.Bytes(x.BytesSent), $"{x.DurationMs:0.0} ms",
                Units.Rate(x.BandwidthBytesPerSecond), x.Final || !source ? "-" : $"{x.DirtyRatePagesPerSecond:N0} pages/s",
            };
            if (held) { cells.Add(x.PagesSkipped.ToString("N0", CultureInfo.InvariantCulture)); cells.Add(x.PagesDeferred.ToString("N0", CultureInfo.InvariantCulture)); }
            if (slowed) cells.Add(Slowed(x));
            rounds.AddRow([.. cells.Select(Markup.Escape)]);
        }
        console.Write(rounds);
    }

    /// <summary>A value for a table cell: peer text escaped (a destination's report shows the source's names and errors), then markup.</summary>
    private static string Shown(string value) => Markup.Escape(Protocol.PeerText.Escape(value));

    /// <summary>"50%" (throttle), "1,000/s" (dirty limit per vCPU), both, or "-".</summary>
    internal static string Slowed(RoundReport x) =>
        x.Throttle <= 0 && x.DirtyLimit <= 0 ? "-"
        : string.Join(" ", new[] { x.Throttle > 0 ? (x.Throttle * 100).ToString("0", CultureInfo.InvariantCulture) + "%" : null, x.DirtyLimit > 0 ? $"{x.DirtyLimit.ToString("N0", CultureInfo.InvariantCulture)}/s" : null }.OfType<string>());
}

/// <summary>Live progress: a bar per round when the terminal is interactive.</summary>
internal sealed class SpectreProgress(ProgressContext ctx) : IMigrationObserver
{
    private ProgressTask? _task;
    private int _round;
    private bool _final;
    private long _startBytes;
    private long _startTicks;

    public void RoundStarted(int round, long pagesToSend, bool final)
    {
        _round = round;
        _final = final;
        _task = ctx.AddTask(Label(0), maxValue: Math.Max(pagesToSend, 1));
        _startBytes = -1;
        _startTicks = System.Diagnostics.Stopwatch.GetTimestamp();
    }

    public void Progress(int round, long pagesSentInRound, long pagesToSend, long bytesOnWire)
    {
        if (_task is null) return;
        if (_startBytes < 0) _startBytes = bytesOnWire;
        double secs = System.Diagnostics.Stopwatch.GetElapsedTime(_startTicks).TotalSeconds;
        _task.Value = pagesSentInRound;
        _task.Description = Label((bytesOnWire - _startBytes) / Math.Max(secs, 1e-6)) + $" {pagesToSend - pagesSentInRound:N0} pages left";
    }

    public void RoundCompleted(RoundReport r)
    {
        if (_task is null) return;
        _task.Value = _task.MaxValue;
        _task.Description = Label(r.BandwidthBytesPerSecond) + (r.Final ? "" : $" {r.PagesDirtied:N0} dirtied ({r.DirtyRatePagesPerSecond:N0}/s)");
        _task.StopTask();
    }

    private string Label(double bw) => Markup.Escape($"round {_round}{(_final ? " stop-and-copy" : "")} {Units.Rate(bw)}");
}

/// <summary>Progress as one line per round, for logs and pipes.</summary>
internal sealed class LineProgress(TextWriter output) : IMigrationObserver
{
    public void Phase(string phase) => output.WriteLine($"[{DateTime.Now:HH:mm:ss.fff}] {phase}");

    public void RoundCompleted(RoundReport r) =>
        output.WriteLine(r.Final
            ? $"  round {r.Round} (stop-and-copy): {r.PagesSent:N0} pages, {Units.Bytes(r.BytesSent)} in {r.DurationMs:0.0} ms"
            : $"  round {r.Round}: {r.PagesSent:N0} pages, {Units.Bytes(r.BytesSent)} in {r.DurationMs:0.0} ms at {Units.Rate(r.BandwidthBytesPerSecond)}; {r.PagesDirtied:N0} dirtied ({r.DirtyRatePagesPerSecond:N0} pages/s)"
              + (r.PagesSkipped > 0 || r.PagesDeferred > 0 ? $"; {r.PagesSkipped:N0} skipped, {r.PagesDeferred:N0} deferred" : "")
              + (r.Throttle > 0 || r.DirtyLimit > 0 ? $"; guest slowed: {ReportView.Slowed(r)}{(r.DirtyLimit > 0 ? " per vCPU" : "")}" : ""));
}
