using System.CommandLine;
using System.Net;
using LiveMig.Engine;
using LiveMig.Policies;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Simulation;
using LiveMig.Vm;

namespace LiveMig.Cli;

/// <summary><c>livemig predict</c> (issue 15): observes a running built-in VM for a short window and predicts each strategy's cost with the simulator (<see cref="MigrationPredictor"/>).</summary>
internal static class PredictCommand
{
    public static Command Create(CliOptions o, Func<ParseResult, Func<int>, int> guard)
    {
        var window = new Option<string>("--window") { Description = "How long to observe the running VM (its dirty log harvested every --interval).", DefaultValueFactory = _ => "2s", HelpName = "TIME" };
        var interval = new Option<string>("--interval") { Description = "The dirty log's harvest interval while observing: the shortest span of the dirty-rate curve.", DefaultValueFactory = _ => "100ms", HelpName = "TIME" };
        var link = new Option<string?>("--link") { Description = "The link's rate to predict over, e.g. 1Gbit (default: this machine's loopback, measured).", HelpName = "RATE" };
        var rtt = new Option<string?>("--rtt") { Description = "The link's round trip (default: the loopback's, measured).", HelpName = "TIME" };
        var check = new Option<bool>("--check") { Description = "Then migrate the VM for real (pre-copy, over loopback to an agent in this process, capped to --link) and print the prediction's error against it." };
        var cmd = new Command("predict", "Starts a built-in VM (as demo does), lets it run for --warmup, observes it for --window — dirty pages per interval from its dirty log, the pages it wrote, a content sample of its pages — fits the simulator's dirty model to that, and predicts the total time, downtime and bytes of a migration over the link for each strategy (pre-copy as the engine runs it, with on-stall throttle, with LZ4, with the adaptive codec choice) by running the engine's own round controller and pre-copy policy on a virtual clock. Nothing is sent.")
        {
            o.Memory, o.Vcpus, o.Workload, o.Seed, o.Fill, o.DirtyLog, o.Name, o.Warmup, o.DowntimeLimit, o.Bandwidth, o.Json, window, interval, link, rtt, check,
        };
        cmd.SetAction(r => guard(r, () => Run(r, o, Duration(r, window, "--window"), Duration(r, interval, "--interval"), r.GetValue(link), r.GetValue(rtt), r.GetValue(check))));
        return cmd;
    }

    private static TimeSpan Duration(ParseResult r, Option<string> option, string name)
    {
        string text = r.GetValue(option)!;
        if (!Units.TryParseDuration(text, out var t) || t <= TimeSpan.Zero || t > TimeSpan.FromMinutes(10)) throw new UsageException($"{name} '{text}': expected a positive duration of at most 10 minutes, e.g. 2s");
        return t;
    }

    private static int Run(ParseResult r, CliOptions o, TimeSpan window, TimeSpan interval, string? linkText, string? rttText, bool check)
    {
        if (window < interval) throw new UsageException($"--window {window.TotalMilliseconds:0} ms is shorter than --interval {interval.TotalMilliseconds:0} ms");
        var config = o.VmConfig(r, MachineMemory.TotalBytes / 2);
        var precopy = new PreCopyOptions { DowntimeLimit = Positive(r.GetValue(o.DowntimeLimit)!, "--downtime-limit") };
        string bw = r.GetValue(o.Bandwidth)!;
        if (!Units.TryParseRate(bw, out long cap)) throw new UsageException($"--bandwidth '{bw}': expected a rate such as 100MiB/s or 1Gbit, or unlimited");
        double rate = 0;
        if (linkText is not null && (!Units.TryParseRate(linkText, out long l) || (rate = l) <= 0)) throw new UsageException($"--link '{linkText}': expected a rate such as 1Gbit or 100MiB/s");
        TimeSpan? roundTrip = rttText is null ? null : Positive(rttText, "--rtt");
        bool json = r.GetValue(o.Json);
        LoopbackLink? loopback = linkText is null || rttText is null || check ? LoopbackLink.Measure() : null;
        // With --check the real run is loopback capped to the link's rate: the prediction is for that link (the cap, if lower, on top).
        var predictionLink = new PredictionLink(rate > 0 ? rate : loopback!.BytesPerSecond, roundTrip ?? loopback!.RoundTrip, cap);
        // Before the VM starts: the first migration in a process pays the JIT (docs/simulator.md, validation), which the check should not compare.
        if (check) ScenarioValidator.WarmUp();
        using var vm = BuiltInVm.Create(config);
        vm.Start();
        if (!json) Console.Error.WriteLine($"VM {config.Name}: {Units.Bytes(config.MemoryBytes)}, {config.Vcpus} vCPUs, workload {PeerText.Escape(config.Workload)}; warming up {o.WarmupTime(r).TotalSeconds:0.###} s, then observing for {window.TotalSeconds:0.###} s");
        Thread.Sleep(o.WarmupTime(r));
        var observation = VmObserver.Observe(vm, window, interval, seed: config.Seed);
        var prediction = MigrationPredictor.Predict(observation, predictionLink, MigrationPredictor.DefaultCases(precopy));
        MigrationReport? actual = null;
        if (check)
        {
            var options = ScenarioValidator.EngineOptions(new SimMigrationOptions { PreCopy = precopy, BandwidthCap = cap > 0 ? Math.Min(cap, predictionLink.BytesPerSecond) : predictionLink.BytesPerSecond });
            actual = MigrateOverLoopback(vm, options);
        }
        if (json) Console.WriteLine(actual is null ? prediction.ToJson() : $"{{\"prediction\":{prediction.ToJson()},\"actual\":{actual.ToJson()}}}");
        else Render(prediction, actual, Console.Out);
        return actual is null || actual.Outcome == "completed" ? 0 : 1;
    }

    private static TimeSpan Positive(string text, string name) =>
        Units.TryParseDuration(text, out var t) && t > TimeSpan.Zero ? t : throw new UsageException($"{name} '{text}': expected a positive duration such as 300ms");

    private static MigrationReport MigrateOverLoopback(BuiltInVm vm, MigrationOptions options)
    {
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions());
        listener.Arrived += a => arrived.TrySetResult(a);
        listener.Start();
        var report = new PreCopyMigration(vm, options).MigrateTo("127.0.0.1", listener.Port);
        if (arrived.Task.Wait(TimeSpan.FromSeconds(30))) arrived.Task.Result.Vm.Stop();
        return report;
    }

    private static void Render(Prediction p, MigrationReport? actual, TextWriter o)
    {
        var ob = p.Observation;
        double firstRate = ob.Curve.Count > 0 ? ob.Curve[0].MeanPages / ob.Curve[0].SpanS : 0;
        o.WriteLine($"observed {ob.WindowS:0.###} s: {firstRate:0} distinct pages/s per {ob.IntervalS * 1000:0} ms interval, {ob.WorkingSetPages:N0} pages written ({Units.Bytes(ob.WorkingSetPages * Memory.GuestMemory.PageSize)}), {ob.PresentPages:N0} of {ob.PageCount:N0} pages present");
        var f = p.Fitted;
        o.WriteLine($"fitted: {f.Rate:0} page writes/s over a working set of {Units.Bytes(f.WorkingSet * Memory.GuestMemory.PageSize)}" + (f.HotShare > 0 ? $", {f.HotShare * 100:0.#}% of it hot taking {f.HotWrites * 100:0}% of the writes" : ", uniform"));
        o.WriteLine($"link: {Units.Rate(p.Link.BytesPerSecond)}, round trip {p.Link.RoundTrip.TotalMicroseconds:0} µs" + (p.Link.CapBytesPerSecond > 0 ? $", cap {Units.Rate(p.Link.CapBytesPerSecond)}" : ""));
        var rows = new List<string[]> { new[] { "strategy", "total ms", "downtime ms", "bytes", "rounds", "stop reason", "outcome" } };
        foreach (var s in p.Strategies)
            rows.Add([s.Strategy, $"{s.TotalMs:0.0}", s.Outcome == "completed" ? $"{s.DowntimeMs:0.0}" : "-", Units.Bytes(s.BytesOnWire), s.Rounds.ToString(), s.StopReason, s.Outcome]);
        if (actual is not null)
            rows.Add(["actual (precopy)", $"{actual.TotalTimeMs:0.0}", $"{actual.DowntimeMs:0.0}", Units.Bytes(actual.BytesOnWire), actual.Rounds.Count.ToString(), actual.StopReason, actual.Outcome]);
        int[] width = new int[rows[0].Length];
        foreach (var row in rows) for (int i = 0; i < row.Length; i++) width[i] = Math.Max(width[i], row[i].Length);
        foreach (var row in rows)
            o.WriteLine(string.Join("  ", row.Select((c, i) => i is >= 1 and <= 4 ? c.PadLeft(width[i]) : c.PadRight(width[i]))).TrimEnd());
        if (actual is not null && p.Strategies[0] is { } pre && actual.TotalTimeMs > 0)
            o.WriteLine($"prediction error (precopy): total time {Err(pre.TotalMs, actual.TotalTimeMs)}, downtime {Err(pre.DowntimeMs, actual.DowntimeMs)}, bytes {Err(pre.BytesOnWire, actual.BytesOnWire)}");
    }

    private static string Err(double predicted, double actual) => actual > 0 ? $"{(predicted - actual) / actual * 100:+0.0;-0.0;0.0}%" : "-";
}
