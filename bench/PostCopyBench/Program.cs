using System.Diagnostics;
using System.Globalization;
using System.Net;
using LiveMig;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Reporting;
using LiveMig.Vm;

// Post-copy benchmarks:
//  1. A VM whose random workload dirties memory faster than a capped link: pre-copy vs post-copy
//     vs hybrid, side by side (downtime, total time, bytes, faults, fault latency).
//  2. Fault service latency over loopback with the background push running (no cap).
// Options: --memory SIZE (2GiB) --rate PAGES/S (50000) --bandwidth BYTES/S (100000000)
//          --strategies LIST (precopy,postcopy,hybrid) --precopy-rounds N (2) --hybrid-rounds N (1)
//          --latency-memory SIZE (1GiB) --latency-rate PAGES/S (20000) --paging auto|portable|userfaultfd
var opt = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase);
for (int i = 0; i + 1 < args.Length; i += 2) opt[args[i].TrimStart('-')] = args[i + 1];
string Get(string k, string d) => opt.TryGetValue(k, out var v) ? v : d;
long Bytes(string k, string d) => Units.TryParseBytes(Get(k, d), out long b) ? b : throw new ArgumentException($"--{k}");
long memory = Bytes("memory", "2GiB"), latencyMemory = Bytes("latency-memory", "1GiB");
double rate = double.Parse(Get("rate", "50000"), CultureInfo.InvariantCulture);
double latencyRate = double.Parse(Get("latency-rate", "20000"), CultureInfo.InvariantCulture);
long bandwidth = long.Parse(Get("bandwidth", "100000000"), CultureInfo.InvariantCulture);
var paging = Get("paging", "auto") switch { "portable" => DemandPagingMode.Portable, "userfaultfd" => DemandPagingMode.Userfaultfd, _ => DemandPagingMode.Auto };
string[] strategies = Get("strategies", "precopy,postcopy,hybrid").Split(',', StringSplitOptions.RemoveEmptyEntries);

Console.WriteLine($"# {Environment.ProcessorCount} cores, {DateTime.UtcNow:u}");
Console.WriteLine($"## {Units.Bytes(memory)} VM, random workload at {rate:N0} page writes/s ({rate * 4096 / 1e6:N0} MB/s of dirtying), link capped at {bandwidth / 1e6:N0} MB/s");
Console.WriteLine("| strategy | outcome | verified | downtime ms | total s | to resume s | bytes on wire | rounds | pushed | requested | faults | fault p50 µs | p99 µs | max µs | demand paging |");
Console.WriteLine("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
foreach (string s in strategies)
{
    if (s is not ("precopy" or "postcopy" or "hybrid")) continue;
    var strategy = s switch { "postcopy" => MigrationStrategy.PostCopy, "hybrid" => MigrationStrategy.Hybrid, _ => MigrationStrategy.PreCopy };
    var options = new MigrationOptions
    {
        Strategy = strategy,
        BandwidthLimit = bandwidth,
        PreCopy = new PreCopyOptions { MaxRounds = int.Parse(Get("precopy-rounds", "2"), CultureInfo.InvariantCulture) },
        PostCopy = new PostCopyOptions { Hybrid = new HybridOptions { MaxRounds = int.Parse(Get("hybrid-rounds", "1"), CultureInfo.InvariantCulture) } },
    };
    var (src, dst) = Run(memory, $"random:rate={rate.ToString(CultureInfo.InvariantCulture)}", options, paging);
    var f = src.FaultLatencyUs;
    Console.WriteLine($"| {src.Strategy} | {src.Outcome} | {src.Verified} | {src.DowntimeMs:F0} | {src.TotalTimeMs / 1000:F1} | {(src.Strategy == "precopy" ? src.TotalTimeMs : src.TimeToResumeMs) / 1000:F1} | {Units.Bytes(src.BytesOnWire)} | {src.Rounds.Count} | {src.PagesPushed:N0} | {src.PagesRequested:N0} | {src.Faults:N0} | {f?.P50 ?? 0:F0} | {f?.P99 ?? 0:F0} | {f?.Max ?? 0:F0} | {dst?.DemandPaging ?? "-"} |");
}

Console.WriteLine();
Console.WriteLine($"## Fault service latency over loopback: {Units.Bytes(latencyMemory)} VM, random workload at {latencyRate:N0} page writes/s, post-copy, no cap (the background push runs throughout)");
Console.WriteLine("| demand paging | faults | p50 µs | p99 µs | max µs | request service p50 / p99 µs (source) | pushed | requested | resent | post-copy s |");
Console.WriteLine("|---|---:|---:|---:|---:|---|---:|---:|---:|");
foreach (var mode in new[] { DemandPagingMode.Userfaultfd, DemandPagingMode.Portable })
{
    var (src, dst) = Run(latencyMemory, $"random:rate={latencyRate.ToString(CultureInfo.InvariantCulture)}", new MigrationOptions { Strategy = MigrationStrategy.PostCopy }, mode);
    var f = src.FaultLatencyUs!;
    Console.WriteLine($"| {dst?.DemandPaging} | {src.Faults:N0} | {f.P50:F0} | {f.P99:F0} | {f.Max:F0} | {src.RequestServiceUs?.P50:F0} / {src.RequestServiceUs?.P99:F0} | {src.PagesPushed:N0} | {src.PagesRequested:N0} | {src.PagesResent:N0} | {src.PostCopyMs / 1000:F2} |");
}

static (MigrationReport Source, MigrationReport? Destination) Run(long memory, string workload, MigrationOptions options, DemandPagingMode paging)
{
    var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
    using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions { PostCopy = new PostCopyDestinationOptions { Mode = paging } });
    listener.Arrived += a => arrived.TrySetResult(a);
    listener.Start();
    using var vm = BuiltInVm.Create(new VmConfig { MemoryBytes = memory, Vcpus = 2, Workload = workload, Fill = MemoryFill.Random, Seed = 7 });
    vm.Start();
    Thread.Sleep(1000);
    MigrationReport report;
    try { report = Migrations.MigrateTo(vm, options, null, "127.0.0.1", listener.Port); }
    catch (MigrationFailedException e) { report = e.Report; }
    var dst = arrived.Task.Wait(TimeSpan.FromSeconds(60)) ? arrived.Task.Result.Report : null;
    Console.Error.WriteLine(report.ToJson());
    return (report, dst);
}
