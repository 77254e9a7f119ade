using System.CommandLine;
using System.Text.Json;
using LiveMig.Mtd;
using LiveMig.Protocol;
using LiveMig.Workloads;

namespace LiveMig.Cli;

/// <summary><c>livemig mtd run</c>: a real VM kept moving between agents on a schedule, each move verified, while a client uses it.</summary>
internal static class MtdRunCommand
{
    public static Command Create(CliOptions o, Func<ParseResult, Func<int>, int> guard)
    {
        var agents = new Option<int>("--agents") { Description = "How many agents the VM moves between (in this process, each a destination agent on its own 127.0.0.1 port: real TCP, the real engine; 3 to 64).", DefaultValueFactory = _ => 3, HelpName = "N" };
        var interval = new Option<string?>("--interval") { Description = "A move every TIME (start to start; a move that takes longer is followed at once).", HelpName = "TIME" };
        var poisson = new Option<string?>("--poisson") { Description = "Moves at random, a Poisson process with this MEAN interval (seeded by --seed).", HelpName = "MEAN" };
        var moves = new Option<int?>("--moves") { Description = "Stop after N moves.", HelpName = "N" };
        var duration = new Option<string?>("--duration") { Description = "Stop after TIME (with --moves: whichever comes first).", HelpName = "TIME" };
        var cmd = new Command("run", "Keeps one built-in VM running the kv workload (or, with --qemu, the boot-sector QEMU guest, which checks its own memory on every pass; or, with --qemu-kernel and --qemu-forward 6379, the Linux guest whose redis a client keeps using) moving between agents on a schedule, each move the agent's own onward migration (verified), while a client outside the VM keeps sending requests to its address (or the guest reports after each move); prints each move's downtime and what the client saw, then the totals, and checks at every millisecond that the VM runs on exactly one agent. Exit 0 only if every move completed verified, no request was lost or answered wrong, and the VM was never on two agents or none.")
        {
            agents, interval, poisson, moves, duration,
        };
        o.AddVmOptions(cmd);
        o.AddMigrationOptions(cmd);
        cmd.SetAction(r => guard(r, () =>
        {
            var options = Options(r, o, agents, interval, poisson, moves, duration);
            return Run(options, r.GetValue(o.Json));
        }));
        return cmd;
    }

    private static LiveMtdOptions Options(ParseResult r, CliOptions o, Option<int> agents, Option<string?> interval, Option<string?> poisson, Option<int?> moves, Option<string?> duration)
    {
        if (r.GetResult(o.MemoryFile) is { Implicit: false }) throw new UsageException("--memory-file: not with mtd run (the VM's memory moves from agent to agent)");
        var migration = o.MigrationOptions(r);
        var qemu = QemuCommands.Spec(o, r, migration);
        var config = o.VmConfig(r);
        // The boot-sector guest checks itself; the Linux guest's redis is used by a client through its forwarded port.
        if (qemu is { Kernel: not null } && !qemu.Forward.Contains(LiveMtdOptions.RedisPort))
            throw new UsageException($"--qemu-kernel: mtd run's client uses the Linux guest's redis: give --qemu-forward {LiveMtdOptions.RedisPort}");
        if (qemu is not null) { }
        else if (r.GetResult(o.Workload) is null or { Implicit: true }) config = config with { Workload = "kv" };
        else if (WorkloadSpec.Parse(config.Workload).Name != "kv") throw new UsageException($"--workload '{PeerText.Escape(config.Workload)}': mtd run needs kv (a client keeps using the VM's store), e.g. kv or kv:keys=4096");
        TimeSpan? Duration(Option<string?> opt)
        {
            if (r.GetValue(opt) is not { } text) return null;
            if (!MtdUnits.TryParseDuration(text, out var d)) throw new UsageException($"{opt.Name} '{PeerText.Escape(text)}': expected a duration such as 500ms, 30s or 2h");
            return d;
        }
        var every = Duration(interval);
        var mean = Duration(poisson);
        if ((every is null) == (mean is null)) throw new UsageException("give the schedule: --interval TIME or --poisson MEAN (one of them)");
        if (mean is { } m && m <= TimeSpan.Zero) throw new UsageException("--poisson: the mean must be above 0");
        var stopAfter = Duration(duration);
        int? count = r.GetValue(moves);
        if (count is null && stopAfter is null) throw new UsageException("give when to stop: --moves N or --duration TIME");
        if (count is < 1 or > 1_000_000) throw new UsageException($"--moves {count}: 1 to 1000000");
        if (stopAfter is { } d && (d <= TimeSpan.Zero || d > TimeSpan.FromDays(30))) throw new UsageException("--duration: above 0, at most 30d");
        int n = r.GetValue(agents);
        if (n is < 3 or > 64) throw new UsageException($"--agents {n}: 3 to 64");
        return new LiveMtdOptions
        {
            Vm = config, Migration = migration, Agents = n,
            Qemu = qemu, QemuHost = qemu is null ? null : new Qemu.QemuHostOptions { AllowedImageDirectories = [.. new[] { qemu.BootImage, qemu.Kernel, qemu.Initrd }.OfType<string>().Select(f => Path.GetDirectoryName(f)!).Distinct()] }, Interval = every, PoissonMean = mean, Moves = count, Duration = stopAfter,
            Seed = r.GetValue(o.Seed), Warmup = o.WarmupTime(r),
        };
    }

    private static int Run(LiveMtdOptions options, bool json)
    {
        using var cancel = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) =>
        {
            e.Cancel = true;
            cancel.Cancel(); // the move under way is cancelled (the VM stays where it was), then the totals
        };
        using var mtd = new LiveMtd(options);
        if (!json)
        {
            Console.Error.WriteLine(options.Qemu is { } q
                ? $"VM {options.Vm.Name}: QEMU guest {Path.GetFileName(q.BootImage)}, {Units.Bytes(q.MemoryBytes)}, {q.Vcpus} vCPUs (it checks its own memory on every pass); agents {string.Join(", ", mtd.AgentNames)}"
                : $"VM {options.Vm.Name}: {Units.Bytes(options.Vm.MemoryBytes)}, {options.Vm.Vcpus} vCPUs, workload {options.Vm.Workload}; agents {string.Join(", ", mtd.AgentNames)}");
            Console.WriteLine(options.Qemu is null || options.Qemu.Kernel is not null
                ? $"move  from → to                          total ms  downtime ms       bytes  rounds  verified  {(options.Qemu is null ? "client" : "redis")}: requests  {(options.Qemu is null ? "max latency" : "longest gap")} ms  errors"
                : "move  from → to                          total ms  downtime ms       bytes  rounds  verified  guest: passes  errors");
        }
        var result = mtd.Run(m => { if (!json) Console.WriteLine(Line(m, options.Qemu is { Kernel: null }, options.Qemu is { Kernel: not null })); }, cancel.Token);
        if (json) Console.WriteLine(JsonSerializer.Serialize(result, MtdCliJson.Default.LiveMtdResult));
        else Totals(result, Console.Out);
        if (result.Stopped is { } why) Console.Error.WriteLine($"livemig: mtd run: {PeerText.Escape(why)}");
        return result.Clean ? 0 : 1;
    }

    /// <param name="guest">the boot-sector guest (its passes and errors); <paramref name="redis"/>: the Linux guest's redis client (its longest gap, not its longest request).</param>
    private static string Line(LiveMove m, bool guest, bool redis) =>
        $"{m.Index,4}  {m.From} → {m.To}  {m.TotalMs,11:0.0}  {m.DowntimeMs,11:0.0}  {Units.Bytes(m.BytesOnWire),10}  {m.Rounds,6}  {(m.Verified ? "yes" : "NO"),8}  " +
        (guest ? $"{m.GuestPasses,13}  {m.GuestErrors,6}" : $"{m.ClientRequests,15}  {(redis ? m.ClientLongestGapMs : m.ClientMaxLatencyMs),14:0.0}  {m.ClientErrors,6}") +
        (m.Outcome == "completed" ? "" : $"  {m.Outcome}: {PeerText.Escape(m.Error)}");

    private static void Totals(LiveMtdResult r, TextWriter o)
    {
        o.WriteLine();
        o.WriteLine($"{r.Completed} moves completed, {r.Failed} failed, in {r.ElapsedS:0.0} s; downtime {r.TotalDowntimeMs:0.0} ms in all (longest {r.MaxDowntimeMs:0.0} ms); {Units.Bytes(r.TotalBytes)} on the wire");
        if (r.Client is { } c)
            o.WriteLine($"client: {c.Count} requests, {c.Errors} errors, {c.Mismatches} wrong answers; p50 {c.P50Us / 1000:0.00} ms, p99 {c.P99Us / 1000:0.00} ms, longest {c.MaxUs / 1000:0.0} ms{(c.Failure is { } f ? $"; stopped: {PeerText.Escape(f)}" : "")}");
        if (r.Redis is { } x)
            o.WriteLine($"redis client: {x.Requests} replies, {x.Errors} failed requests (a connection broken by a move, then a reconnection: {x.Reconnects}), {x.WrongAnswers} wrong answers, longest gap {x.LongestGapMs:0} ms; " +
                        $"{x.KeysChecked} acknowledged keys read back at the end: {x.KeysMissing} missing, {x.KeysWrong} wrong; {x.Stalls} moves after which redis did not answer again");
        if (r.Guest is { } g)
            o.WriteLine($"guest: {g.Passes} passes over its range through the moves, {g.Errors} stale or lost pages found, {g.Stalls} moves after which it reported no progress");
        var k = r.Checks;
        o.WriteLine($"hosts: {k.Looks} looks at the agents' registries: on two at once {k.TwoRunning}, on none {k.Lost}, running nowhere (inside a switch-over) {k.NoneRunning}; not exactly on its destination after a move {k.WrongAfterMove}");
        o.WriteLine(r.InvariantBroken is null ? "the workload's invariant holds on the VM where it ended" : $"workload invariant BROKEN: {PeerText.Escape(r.InvariantBroken)}");
    }
}

[System.Text.Json.Serialization.JsonSourceGenerationOptions(PropertyNamingPolicy = System.Text.Json.Serialization.JsonKnownNamingPolicy.CamelCase)]
[System.Text.Json.Serialization.JsonSerializable(typeof(LiveMtdResult))]
internal partial class MtdCliJson : System.Text.Json.Serialization.JsonSerializerContext;
