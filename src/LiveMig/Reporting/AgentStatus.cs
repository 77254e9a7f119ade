using System.Text.Json;
using System.Text.Json.Serialization;

namespace LiveMig.Reporting;

/// <summary>
/// The live figures of one migration in progress, as QEMU's <c>query-migrate</c> gives them
/// (<c>livemig status ID</c>). A stable JSON contract like the report (docs/report.md, "Status
/// and list"): fields are added, never renamed or removed. Times are milliseconds, sizes bytes.
/// </summary>
public sealed record MigrationStatus
{
    public string MigrationId { get; init; } = "";
    /// <summary><c>source</c> or <c>destination</c>: which side answers.</summary>
    public string Role { get; init; } = "source";
    public string Strategy { get; init; } = "precopy";
    public string VmName { get; init; } = "";
    public long MemoryBytes { get; init; }
    /// <summary>Source: the destination as HOST:PORT; destination: the authenticated source, or empty.</summary>
    public string Peer { get; init; } = "";
    /// <summary><c>handshake</c>, <c>live</c>, <c>stop-and-copy</c>, <c>switch-over</c>, <c>post-copy</c>, <c>reconnecting</c>, … as the engine names it.</summary>
    public string Phase { get; init; } = "handshake";
    public DateTimeOffset StartedAt { get; init; }
    public double ElapsedMs { get; init; }
    /// <summary>The round in progress (or last begun); -1 before round 0.</summary>
    public int Round { get; init; } = -1;
    /// <summary>Pages still to send that the source knows of: the rest of the round in progress, else the pages found dirty at the last round's end; -1 unknown.</summary>
    public long PagesRemaining { get; init; } = -1;
    /// <summary>Pages written per second, as measured over the last completed round (0 before one completed).</summary>
    public double DirtyRatePagesPerSecond { get; init; }
    /// <summary>The migration's rate on the wire: the round in progress, else the last one.</summary>
    public double BandwidthBytesPerSecond { get; init; }
    /// <summary>What a stop-and-copy now would pause the VM for, as estimated after the last round (source: the policy's estimate; destination: the remaining pages at that round's bytes per page and bandwidth); -1 unknown.</summary>
    public double ExpectedDowntimeMs { get; init; } = -1;
    /// <summary>Bytes written (source) or read (destination) so far, on every connection of the migration.</summary>
    public long BytesTransferred { get; init; }
    /// <summary>Pages sent (source) or placed (destination) so far, every round counted.</summary>
    public long PagesTransferred { get; init; }
    /// <summary>The bandwidth cap (source; 0 = unlimited).</summary>
    public long BandwidthLimitBytesPerSecond { get; init; }

    public string ToJson() => JsonSerializer.Serialize(this, AgentJson.Default.MigrationStatus);

    public static MigrationStatus FromJson(string json) =>
        JsonSerializer.Deserialize(json, AgentJson.Default.MigrationStatus) ?? throw new InvalidDataException("empty status");
}

/// <summary>One VM an agent holds (<c>livemig list</c>).</summary>
public sealed record HostedVmInfo
{
    public string Name { get; init; } = "";
    public string Kind { get; init; } = "";
    public long MemoryBytes { get; init; }
    public int Vcpus { get; init; }
    public string Workload { get; init; } = "";
    /// <summary><c>running</c>, <c>paused</c> (<c>livemig stop</c>, or kept paused after an uncertain switch-over), <c>migrating</c> (leaving: see <see cref="LeavingBy"/>).</summary>
    public string State { get; init; } = "running";
    /// <summary>When it arrived here (or was started here).</summary>
    public DateTimeOffset Since { get; init; }
    /// <summary>The migration that brought it here; null for a VM started here.</summary>
    public string? ArrivedBy { get; init; }
    /// <summary>The migration taking it elsewhere now; null when none.</summary>
    public string? LeavingBy { get; init; }
}

/// <summary>What an agent (or a running <c>livemig migrate</c>) holds: its VMs and the migrations in progress (<c>livemig list --json</c>).</summary>
public sealed record AgentListing
{
    public List<HostedVmInfo> Vms { get; init; } = [];
    public List<MigrationStatus> Migrations { get; init; } = [];

    public string ToJson() => JsonSerializer.Serialize(this, AgentJson.Default.AgentListing);

    public static AgentListing FromJson(string json) =>
        JsonSerializer.Deserialize(json, AgentJson.Default.AgentListing) ?? throw new InvalidDataException("empty listing");
}

[JsonSourceGenerationOptions(PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase, DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(MigrationStatus))]
[JsonSerializable(typeof(AgentListing))]
internal partial class AgentJson : JsonSerializerContext;
