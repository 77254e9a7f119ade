using LiveMig.Core;
using LiveMig.Pipeline;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// The source's report, the part every strategy shares, for success and failure alike: who and
/// what migrated, the settings in force, and what the round controller measured (rounds, brakes,
/// skipped and deferred pages, the stop reason and the estimate behind it). Each engine adds its
/// own measurements to this one record.
/// </summary>
internal static class SourceReport
{
    public static MigrationReport Common(IVirtualMachine vm, MigrationOptions options, Guid id, string strategy, RateLimiter limiter,
        RoundController? rounds, SourcePipeline? pipeline)
    {
        var r = new MigrationReport
        {
            MigrationId = id.ToString(),
            Role = "source",
            Strategy = strategy,
            StartedAt = options.Time.GetUtcNow(),
            VmName = vm.Name,
            Workload = vm.Description,
            MemoryBytes = vm.Memory.Size,
            Vcpus = vm.VcpuCount,
            DirtyLog = strategy == "postcopy" ? "none" : vm.DirtyLog.Name,
            BandwidthLimitBytesPerSecond = limiter.BytesPerSecond,
            DowntimeLimitMs = options.PreCopy.DowntimeLimit.TotalMilliseconds,
            Security = options.Security.Mode,
            Pipeline = options.Pipeline.ToString(),
            Stages = pipeline?.Report() ?? [],
        };
        if (rounds is null) return r;
        var meter = rounds.Meter;
        return r with
        {
            ConvergenceAids = ConvergenceAids(options.PreCopy, rounds.SkipsRewritten),
            PagesSent = rounds.PagesSent,
            StopReason = StopReasons.Name(rounds.Decision.Reason),
            EstimatedDowntimeMs = RoundController.Ms(rounds.Decision.EstimatedDowntime),
            Throttle = rounds.MaxThrottle,
            DirtyLimit = rounds.MaxDirtyLimit,
            PagesSkipped = rounds.PagesSkipped,
            PagesDeferred = rounds.DeferredAtStop,
            ThrottledMs = meter.ThrottledMs,
            OpsPerSecondBeforeThrottle = meter.RateBefore,
            OpsPerSecondThrottled = meter.RateDuring,
            OperationsLost = meter.OperationsLost,
            Rounds = [.. rounds.Rounds],
            Escalations = [.. rounds.Escalations],
        };
    }

    /// <summary>The convergence aids in force, for the report (skip-rewritten only where the dirty log allows it).</summary>
    private static List<string> ConvergenceAids(PreCopyOptions o, bool skipsRewritten)
    {
        var aids = new List<string>();
        if (o.DeferHotPages) aids.Add("defer-hot-pages");
        if (skipsRewritten) aids.Add("skip-rewritten");
        if (o.PredictiveStop) aids.Add("predictive-stop");
        if (o.AutoConverge is not null) aids.Add("auto-converge");
        if (o.DirtyLimit > 0) aids.Add("dirty-limit");
        return aids;
    }

    /// <summary>The bytes on the wire by what they carried.</summary>
    public static WireBytes Wire(long total, EncodingCounters counters, long zeroMarkers, long stateBytes)
    {
        long pageData = counters.TotalBytes();
        long zero = zeroMarkers * PageBatchWriter.EntryHeaderSize;
        return new WireBytes { PageData = pageData, ZeroMarkers = zero, VmState = stateBytes, Protocol = total - pageData - zero - stateBytes };
    }
}
