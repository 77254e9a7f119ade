using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// The destination's report of one migration, made in one place for every strategy and for
/// success and failure alike (docs/report.md says which side fills which field). The engines
/// (<see cref="IncomingMigration"/>, then <see cref="PostCopyIncoming"/> after a switch) record
/// what they learn as it comes; <see cref="Build"/> turns it into the report once, at the end.
/// </summary>
internal sealed class DestinationReport(DestinationOptions options)
{
    public DateTimeOffset Started { get; } = options.Time.GetUtcNow();
    public long StartTimestamp { get; } = options.Time.GetTimestamp();

    /// <summary>The accepted Hello (default until then) and the capabilities agreed.</summary>
    public HelloMessage Hello { get; set; }
    public Capabilities Accepted { get; set; }
    public string Strategy { get; set; } = "precopy";
    /// <summary>The VM once restored (it names its workload, vCPUs, dirty log).</summary>
    public IVirtualMachine? Vm { get; set; }
    public List<RoundReport> Rounds { get; } = [];
    /// <summary>Why the source stopped (or switched), as it said in Prepare (or PostCopyStart).</summary>
    public string StopReason { get; set; } = "";

    // ---- pages ----
    /// <summary>Entries placed, by encoding (plus pages filled from another VM, under dedup).</summary>
    public EncodingCounters Pages { get; } = new();
    /// <summary>
    /// Pages no entry came for in the source's first pass over memory (round 0; pure post-copy:
    /// the pages not pending at the switch): zero here — holes, zero pages the source left out,
    /// and pages it skipped as free — and counted as such by the source.
    /// </summary>
    public long UnsentPages { get; set; }
    public bool FirstRoundCounted { get; private set; }
    /// <summary>Pages filled from another VM's content before round 0 (gang dedup): neither sent nor zero.</summary>
    public long GangFilled { get; set; }
    /// <summary>Pages the source did not send because its guest reported them free (as the source said).</summary>
    public long FreePagesSkipped { get; set; }
    public long PagesPlaced { get; set; }
    public long PagesPushed { get; set; }
    public long PagesRequested { get; set; }
    public Dictionary<string, StageReport> Stages { get; set; } = [];
    public int Streams { get; set; } = 1;

    // ---- wire ----
    public long BytesOnWire { get; set; }
    public long VmStateBytes { get; set; }

    // ---- times (timestamps of DestinationOptions.Time, 0 = not reached) ----
    /// <summary>The pause as the destination saw it: the final RoundStart (pre-copy) or PostCopyStart.</summary>
    public long PausedTs { get; set; }
    public long ResumedTs { get; set; }
    /// <summary>The end: the resume (pre-copy) or the last page (post-copy); 0 = when the report is built.</summary>
    public long EndTs { get; set; }
    public DowntimeBreakdown? DowntimeBreakdown { get; set; }

    // ---- verification ----
    public bool? Verified { get; set; }
    public double VerifyMs { get; set; }
    public ulong DestinationHash { get; set; }
    public ulong SourceHash { get; set; }

    // ---- failures survived, post-copy ----
    public int Reconnects { get; set; }
    public long NetworkFaults { get; set; }
    public long Faults { get; set; }
    public LatencySummary? FaultLatencyUs { get; set; }
    public string? DemandPaging { get; set; }

    /// <summary>The first round the destination saw complete (round 0, unless a drop cut it) had <paramref name="placed"/> pages: the rest of memory was not sent.</summary>
    public void FirstRoundPlaced(long placed)
    {
        if (FirstRoundCounted) return;
        FirstRoundCounted = true;
        UnsentPages = (Hello.MemoryBytes >> Memory.GuestMemory.PageShift) - placed - GangFilled;
    }

    /// <summary>The report: completed when <paramref name="error"/> is null, else failed with it.</summary>
    public MigrationReport Build(string? error)
    {
        long end = EndTs != 0 ? EndTs : options.Time.GetTimestamp();
        bool postCopy = Strategy != "precopy";
        bool hashes = Verified is not null;
        return new MigrationReport
        {
            MigrationId = Hello.MigrationId.ToString(),
            Role = "destination",
            Strategy = Strategy,
            Outcome = error is null ? "completed" : "failed",
            Error = PeerText.Escape(error), // may quote the source
            Security = options.Security.Mode,
            VmName = PeerText.Escape(Hello.VmName),
            Workload = PeerText.Escape(Vm?.Description), // from the VM state: the peer's
            MemoryBytes = Hello.MemoryBytes,
            Vcpus = Vm?.VcpuCount ?? Hello.Vcpus,
            DirtyLog = Vm is not null && error is null ? Vm.DirtyLog.Name : "", // a failed VM is discarded: no log to name
            StartedAt = Started,
            TotalTimeMs = options.Time.GetElapsedTime(StartTimestamp, end).TotalMilliseconds,
            DowntimeMs = Ms(PausedTs, ResumedTs),
            VerifyMs = VerifyMs,
            DowntimeBreakdown = DowntimeBreakdown,
            BytesOnWire = BytesOnWire,
            Bytes = WireBreakdown(),
            PagesByEncoding = PagesByEncoding(),
            Stages = Stages,
            Pipeline = CodecNames(Accepted),
            FrameCheck = PageBatchChecks.Name(PageBatchChecks.Of(Accepted)),
            Streams = Streams,
            PagesSent = PagesPlaced,
            StopReason = StopReason,
            Verified = Verified,
            DestinationHash = hashes ? $"{DestinationHash:x16}" : null,
            SourceHash = hashes ? $"{SourceHash:x16}" : null,
            Reconnects = Reconnects,
            Rounds = Rounds,
            PagesPushed = PagesPushed,
            PagesRequested = PagesRequested,
            NetworkFaults = NetworkFaults,
            Faults = Faults,
            FaultLatencyUs = FaultLatencyUs,
            DemandPaging = DemandPaging,
            TimeToResumeMs = postCopy ? Ms(StartTimestamp, ResumedTs) : 0,
            PostCopyMs = postCopy && ResumedTs != 0 ? options.Time.GetElapsedTime(ResumedTs, end).TotalMilliseconds : 0,
        };
    }

    private double Ms(long from, long to) => from != 0 && to != 0 ? options.Time.GetElapsedTime(from, to).TotalMilliseconds : 0;

    /// <summary>As the source counts them: every entry's payload; zero markers as their entry headers; the VM state's frames; the rest is protocol.</summary>
    private WireBytes WireBreakdown()
    {
        long pageData = Pages.TotalBytes();
        long zero = Pages.Pages(PageEncoding.Zero) * PageBatchWriter.EntryHeaderSize;
        return new WireBytes { PageData = pageData, ZeroMarkers = zero, VmState = VmStateBytes, Protocol = Math.Max(0, BytesOnWire - pageData - zero - VmStateBytes) };
    }

    /// <summary>The entries placed, plus the zero pages no entry came for and the pages skipped as free: the source's count.</summary>
    private Dictionary<string, long> PagesByEncoding()
    {
        var all = new EncodingCounters();
        all.Merge(Pages);
        all.AddPages(PageEncoding.Zero, Math.Max(0, UnsentPages - FreePagesSkipped));
        all.AddSkipped(FreePagesSkipped);
        return all.PagesByName();
    }

    /// <summary>The codecs a migration negotiated, for the report: <c>lz4 zstd xbzrle dedup</c>, or <c>none</c>.</summary>
    private static string CodecNames(Capabilities c)
    {
        var names = new List<string>();
        if ((c & Capabilities.Lz4) != 0) names.Add("lz4");
        if ((c & Capabilities.Zstd) != 0) names.Add("zstd");
        if ((c & Capabilities.Xbzrle) != 0) names.Add("xbzrle");
        if ((c & Capabilities.Dedup) != 0) names.Add("dedup");
        return names.Count == 0 ? "none" : string.Join(' ', names);
    }
}
