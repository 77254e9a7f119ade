using System.Text.Json;
using System.Text.Json.Serialization;

namespace LiveMig.Reporting;

/// <summary>One pre-copy round as the report shows it.</summary>
public sealed record RoundReport
{
    public int Round { get; init; }
    public bool Final { get; init; }
    public long PagesSent { get; init; }
    /// <summary>Pages found dirty at the end of the round (the next round's work).</summary>
    public long PagesDirtied { get; init; }
    public long BytesSent { get; init; }
    public double DurationMs { get; init; }
    public double BandwidthBytesPerSecond { get; init; }
    public double DirtyRatePagesPerSecond { get; init; }
    /// <summary>Pages not sent because they were written again after their harvest (sent later).</summary>
    public long PagesSkipped { get; init; }
    /// <summary>Pending pages held back as hot (sent later, at the latest in the stop-and-copy).</summary>
    public long PagesDeferred { get; init; }
    /// <summary>vCPU throttle (0–0.99) in force during the round.</summary>
    public double Throttle { get; init; }
    /// <summary>Dirty-rate cap in force during the round, pages/s per vCPU (0 = none).</summary>
    public double DirtyLimit { get; init; }
    /// <summary>The policy's estimate, after the round, of a stop-and-copy's downtime (-1: unknown).</summary>
    public double EstimatedDowntimeMs { get; init; }
}

/// <summary>Bytes the source put on the wire, by what they carried.</summary>
public sealed record WireBytes
{
    public long PageData { get; init; }
    public long ZeroMarkers { get; init; }
    public long VmState { get; init; }
    /// <summary>Frame, batch and entry headers and the control messages.</summary>
    public long Protocol { get; init; }
}

/// <summary>
/// One stage of the page pipeline (docs/report.md, <c>stages</c>). Both sides use the same
/// meaning: <see cref="BytesIn"/> is page bytes (pages × 4096), <see cref="BytesOut"/> the
/// payload bytes that stood for them on the wire.
/// </summary>
public sealed record StageReport
{
    /// <summary>Pages that reached the stage (source) or that it decoded (destination).</summary>
    public long PagesOffered { get; init; }
    /// <summary>Pages the stage took (its output was sent for them, or, for free-page skipping, nothing).</summary>
    public long PagesEncoded { get; init; }
    public long BytesIn { get; init; }
    public long BytesOut { get; init; }
    /// <summary><see cref="BytesIn"/> − <see cref="BytesOut"/>: what the stage kept off the wire.</summary>
    public long BytesSaved { get; init; }
    /// <summary>Time the encoding (decoding) thread spent in the stage, attempts that did not pay included.</summary>
    public double CpuMs { get; init; }
    /// <summary>Stage-specific counts (e.g. XBZRLE cacheHits, cacheMisses, overflows).</summary>
    public Dictionary<string, long> Counters { get; init; } = [];
}

/// <summary>What the kv client saw, when the VM ran the kv workload with a client attached.</summary>
public sealed record ClientReport
{
    public long Requests { get; init; }
    public long Errors { get; init; }
    public long Mismatches { get; init; }
    public double P50Us { get; init; }
    public double P99Us { get; init; }
    public double MaxUs { get; init; }
    /// <summary>The longest time the client went without a completed request: the downtime the application saw.</summary>
    public double ObservedDowntimeMs { get; init; }
}

/// <summary>Latency percentiles in microseconds.</summary>
public sealed record LatencySummary
{
    public double P50 { get; init; }
    public double P99 { get; init; }
    public double Max { get; init; }
}

/// <summary>What the kv client saw before the migration, while it ran (pause to last page), and after.</summary>
public sealed record ClientPhases
{
    public ClientReport? Before { get; init; }
    public ClientReport? During { get; init; }
    public ClientReport? After { get; init; }
}

/// <summary>
/// The result of one migration. The JSON form is a stable contract (docs/report.md): fields are
/// added, never renamed or removed.
/// </summary>
public sealed record MigrationReport
{
    public string MigrationId { get; init; } = "";
    /// <summary><c>source</c> or <c>destination</c>: which side wrote the report.</summary>
    public string Role { get; init; } = "source";
    public string Strategy { get; init; } = "precopy";
    /// <summary><c>completed</c> or <c>failed</c>.</summary>
    public string Outcome { get; init; } = "completed";
    public string? Error { get; init; }
    public string VmName { get; init; } = "";
    public string Workload { get; init; } = "";
    public long MemoryBytes { get; init; }
    public int Vcpus { get; init; }
    public string DirtyLog { get; init; } = "";
    public long BandwidthLimitBytesPerSecond { get; init; }
    /// <summary><c>none</c>, <c>tls13-certificates</c> or <c>tls13-psk</c>.</summary>
    public string Security { get; init; } = "none";
    /// <summary>Destination: the authenticated source (certificate name, or <c>psk</c>); null on plain TCP.</summary>
    public string? Peer { get; init; }
    public double DowntimeLimitMs { get; init; }
    public DateTimeOffset StartedAt { get; init; }
    public double TotalTimeMs { get; init; }
    /// <summary>Source pause to destination resume (as the source saw it: includes the resume acknowledgement).</summary>
    public double DowntimeMs { get; init; }
    /// <summary>Where the downtime went, step by step (pre-copy); null when the migration did not reach the pause.</summary>
    public DowntimeBreakdown? DowntimeBreakdown { get; init; }
    /// <summary>Part of the downtime spent hashing memory for verification.</summary>
    public double VerifyMs { get; init; }
    public long BytesOnWire { get; init; }
    public WireBytes Bytes { get; init; } = new();
    public Dictionary<string, long> PagesByEncoding { get; init; } = [];
    /// <summary>The page-pipeline stages in use (compression, XBZRLE, dedup, free-page skipping), keyed by stage name; empty when none.</summary>
    public Dictionary<string, StageReport> Stages { get; init; } = [];
    /// <summary>The pipeline settings in force, e.g. <c>compress=adaptive xbzrle=64.0 MiB dedup skip-free-pages</c>, or <c>none</c>.</summary>
    public string Pipeline { get; init; } = "none";
    /// <summary>
    /// How PageBatch frames were checked (docs/protocol.md, "Frames"): <c>bytes</c> (a hash of the
    /// payload), <c>page-hashes</c> (a hash over the pages' own hashes, which verification reuses)
    /// or <c>none</c> (TLS authenticates them).
    /// </summary>
    public string FrameCheck { get; init; } = "bytes";
    /// <summary>Data connections that carried the pages: 1 = the control connection itself (one connection); N ≥ 2 = N data connections beside it.</summary>
    public int Streams { get; init; } = 1;
    public long PagesSent { get; init; }
    public string StopReason { get; init; } = "";
    public double EstimatedDowntimeMs { get; init; }
    /// <summary>true or false when verification ran, null when it was not asked for.</summary>
    public bool? Verified { get; init; }
    public string? SourceHash { get; init; }
    public string? DestinationHash { get; init; }
    public double Throttle { get; init; }
    /// <summary>Largest dirty-rate cap applied, pages/s per vCPU (0 = none).</summary>
    public double DirtyLimit { get; init; }
    /// <summary>Convergence aids that were on: defer-hot-pages, skip-rewritten, predictive-stop, auto-converge, dirty-limit.</summary>
    public List<string> ConvergenceAids { get; init; } = [];
    /// <summary>Pages skipped in live rounds because they were written again after their harvest.</summary>
    public long PagesSkipped { get; init; }
    /// <summary>Hot pages held back for the stop-and-copy when the live phase ended.</summary>
    public long PagesDeferred { get; init; }
    /// <summary>How long the guest ran throttled or dirty-limited before the pause.</summary>
    public double ThrottledMs { get; init; }
    /// <summary>The guest's operations per second from the start of the migration until it was first slowed; null when it never was (or cannot count).</summary>
    public double? OpsPerSecondBeforeThrottle { get; init; }
    /// <summary>The guest's operations per second while slowed.</summary>
    public double? OpsPerSecondThrottled { get; init; }
    /// <summary>Operations the guest did not do while slowed, compared with its rate before.</summary>
    public long? OperationsLost { get; init; }
    public List<RoundReport> Rounds { get; init; } = [];
    /// <summary>Source: each step beyond plain rounds, one line each: brakes applied, a stall and what became of it (abort, a longer pause, the switch to post-copy).</summary>
    public List<string> Escalations { get; init; } = [];
    /// <summary>Source: how much longer than the downtime limit the pause was, when the user accepted that (<c>--on-stall pause</c>); null otherwise.</summary>
    public double? DowntimeExceededMs { get; init; }
    public ClientReport? Client { get; init; }
    /// <summary>Pre-copy resume: connection drops survived before the switch-over, each by reattaching to the same destination.</summary>
    public int Reconnects { get; init; }
    /// <summary>Source, pre-copy resume: why each connection dropped and what it cost (one line each).</summary>
    public List<string> Interruptions { get; init; } = [];

    // ---- post-copy and hybrid (docs/report.md) ----
    /// <summary>Connection failures survived after the switch to post-copy (each repaired by reconnecting).</summary>
    public long NetworkFaults { get; init; }
    /// <summary>Page faults the destination's vCPUs took on missing pages.</summary>
    public long Faults { get; init; }
    /// <summary>Fault service time as a vCPU saw it: from the fault until the page was there.</summary>
    public LatencySummary? FaultLatencyUs { get; init; }
    /// <summary>Source: from a request's arrival until its answer was written.</summary>
    public LatencySummary? RequestServiceUs { get; init; }
    /// <summary>Pages sent by the background push after the switch, and in answer to requests.</summary>
    public long PagesPushed { get; init; }
    public long PagesRequested { get; init; }
    /// <summary>Source: requested pages sent again because their push was still on its way (not in <see cref="PagesSent"/>).</summary>
    public long PagesResent { get; init; }
    /// <summary>Pushed pages chosen because they neighboured a fault (prepaging).</summary>
    public long PagesPrepaged { get; init; }
    /// <summary>From the start until the VM ran on the destination.</summary>
    public double TimeToResumeMs { get; init; }
    /// <summary>From the destination's resume until its last page arrived.</summary>
    public double PostCopyMs { get; init; }
    /// <summary>Destination: <c>portable</c> or <c>userfaultfd</c>; null for pre-copy.</summary>
    public string? DemandPaging { get; init; }
    public ClientPhases? ClientPhases { get; init; }

    public string ToJson(bool indented = false) =>
        JsonSerializer.Serialize(this, indented ? ReportJson.Indented.MigrationReport : ReportJson.Default.MigrationReport);

    public static MigrationReport FromJson(string json) =>
        JsonSerializer.Deserialize(json, ReportJson.Default.MigrationReport) ?? throw new InvalidDataException("empty report");
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(MigrationReport))]
internal partial class ReportJson : JsonSerializerContext
{
    public static ReportJson Indented { get; } = new(new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase });
}
