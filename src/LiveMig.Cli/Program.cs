using System.CommandLine;
using System.Net;
using LiveMig.Engine;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Vm;
using LiveMig.Workloads;
using Spectre.Console;

namespace LiveMig.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var o = new CliOptions();
        // A plain command named "livemig" (the launcher's name) rather than RootCommand, which would take the DLL's name.
        var root = new Command("livemig", "LiveMig: live migration of a running VM's memory between hosts over TCP, verified and measured.\n" +
                                          "Start with 'livemig demo'; see 'livemig COMMAND --help' for each command.")
        {
            new System.CommandLine.Help.HelpOption(),
            new VersionOption(),
        };

        var demo = new Command("demo", "Runs a source and a destination in this process over loopback TCP: starts a VM, lets its workload run, live-migrates it with a progress display, checks the memory, and prints the report.");
        o.AddVmOptions(demo);
        o.AddMigrationOptions(demo);
        demo.Add(o.DemandPaging);
        demo.SetAction(r => Guard(r, o, () => Demo(r, o)));
        root.Add(demo);

        var port = new Option<int>("--port") { Description = "TCP port to listen on (0 picks a free one; the chosen port is printed).", DefaultValueFactory = _ => 7480 };
        var bind = new Option<string>("--bind") { Description = "Address to listen on: the default takes migrations from this host only; give this host's address (or 0.0.0.0) to take them from other hosts.", DefaultValueFactory = _ => "127.0.0.1", HelpName = "ADDRESS" };
        var once = new Option<bool>("--once") { Description = "Exit after one migration and print its report (exit code 0 only if it completed)." };
        var prealloc = new Option<string?>("--prealloc") { Description = "Prepare memory for incoming VMs before they arrive, as SIZE or SIZExCOUNT (e.g. 4GiBx2): a VM of exactly that size lands in memory already backed, so the migration does not pay the first touch of every page.", HelpName = "SIZE[xN]" };
        var maxMemory = new Option<string?>("--max-memory") { Description = "Largest VM accepted (default: the memory budget, or this machine's memory if less).", HelpName = "SIZE" };
        var trust = new Option<string[]?>("--trust") { Description = "With --tls and certificates: the source names (certificate CN) accepted, comma-separated; others are refused. Default: any certificate the CA signed.", HelpName = "NAMES", AllowMultipleArgumentsPerToken = true };
        var resumeWindow = new Option<string>("--resume-window") { Description = "When a pre-copy source that can resume loses its connection before the switch-over, keep its partial VM this long for it to reconnect; 0 discards at once.", DefaultValueFactory = _ => "60s", HelpName = "TIME" };
        var qemuAllow = new Option<string[]?>("--qemu-allow") { Description = "Receive QEMU guests (migrate --qemu) whose boot images lie in these directories (comma-separated or repeated; symbolic links are resolved first); this agent starts their QEMU itself from the description the source sends. Without it QEMU guests are refused.", HelpName = "DIRS", AllowMultipleArgumentsPerToken = true };
        var listener = new ListenerOptions();
        var agentControl = new Option<string?>("--control") { Description = $"Unix socket for 'livemig list', 'status', 'stop', 'start', 'destroy' and 'migrate --vm'. Default: {ControlSocket.AgentPath(0).Replace("-0.sock", "-PORT.sock")} (PORT: the port listened on).", HelpName = "PATH" };
        var listen = new Command("listen", "Runs a destination agent: accepts migrations (several at once) and keeps every VM that arrives running under its unique name, until 'livemig destroy' drops it or 'livemig migrate --vm' moves it on; 'livemig list' shows them.")
        {
            port, bind, once, maxMemory, listener.MemoryBudget, prealloc, o.DirtyLog, o.Json, trust, o.DemandPaging, resumeWindow, listener.HandshakeTimeout, listener.MaxHandshakes, agentControl, qemuAllow,
        };
        o.AddSecurityOptions(listen);
        listen.SetAction(r => Guard(r, o, () =>
        {
            var names = r.GetValue(trust)?.SelectMany(t => t.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)).ToArray();
            if (names is { Length: 0 }) names = null;
            string rw = r.GetValue(resumeWindow)!;
            if (!Units.TryParseDuration(rw, out var window) || window > TimeSpan.FromDays(1))
                throw new UsageException($"--resume-window '{rw}': expected a duration such as 60s (0 = no resume, at most 1 day)");
            return Listen(r, o, listener, r.GetValue(port), r.GetValue(bind)!, r.GetValue(once), r.GetValue(maxMemory), o.Security(r, names), r.GetValue(prealloc), window, r.GetValue(agentControl), QemuCommands.Factories(r.GetValue(qemuAllow)));
        }));
        root.Add(listen);

        var control = new Option<string>("--control") { Description = $"Unix socket on which a running 'livemig migrate' takes commands from 'livemig cancel', 'set-bandwidth', 'status', 'list' and 'migrate --resume'; refused when another process answers there. With --vm: the agent's control socket (default {ControlSocket.DefaultAgentPath}).", DefaultValueFactory = _ => ControlSocket.DefaultMigratePath, HelpName = "PATH" };
        var to = new Option<string?>("--to") { Description = "Destination agent as HOST:PORT (see 'livemig listen'). With --resume: where the running migration reconnects from now on.", HelpName = "HOST:PORT" };
        var resume = new Option<string?>("--resume") { Description = "Do not start a migration: tell the running 'livemig migrate' whose migration ID this is (printed at its start) to reconnect now instead of waiting out its back-off, to --to if given.", HelpName = "ID" };
        var recover = new Option<string?>("--recover") { Description = "Do not start a migration: after the source of post-copy migration ID died past the switch, serve the destination (--to), which waits for it, the pages it lacks from the source's --memory-file, and verify.", HelpName = "ID" };
        var restart = new Option<bool>("--restart") { Description = "With --resume and --to, after a post-copy switch whose destination is lost for good: start the migration over from this source's paused VM (its state at the switch) to --to. What the VM did on the lost destination since the switch is lost; use it only when that host is gone (or fenced)." };
        var vmName = new Option<string?>("--vm") { Description = "Do not start a VM here: ask the agent at --control that holds VM NAME to migrate it to --to with these options (it leaves that agent only once the migration completed; on failure it keeps running there).", HelpName = "NAME" };
        var migrate = new Command("migrate", "Starts a VM here, lets its workload run for --warmup, then live-migrates it to a destination agent (or, with --vm, has an agent migrate a VM it holds onward). On failure the VM keeps running where it was; a dropped connection is resumed for --reconnect; after a post-copy switch it never gives up on its own (post-copy paused: 'migrate --resume', '--restart', or 'livemig destroy ID'); Ctrl-C or 'livemig cancel' cancels cleanly before the switch-over; 'livemig set-bandwidth' changes the cap and 'livemig status ID' shows the live figures while it runs.") { to, control, resume, restart, recover, vmName };
        o.AddVmOptions(migrate);
        o.AddMigrationOptions(migrate);
        migrate.SetAction(r => Guard(r, o, () =>
        {
            string controlPath = r.GetValue(control)!;
            if (r.GetValue(resume) is { } id)
            {
                if (!Guid.TryParse(id, out _)) throw new UsageException($"--resume '{PeerText.Escape(id)}': expected a migration ID such as 3f2b...-... (printed by 'livemig migrate')");
                if (r.GetValue(vmName) is not null) throw new UsageException("--resume: not with --vm (resume talks to a running 'livemig migrate')");
                if (r.GetValue(to) is { } t) CliOptions.ParseTarget(t);
                if (r.GetValue(restart) && r.GetValue(to) is null) throw new UsageException("--restart: give the new destination with --to HOST:PORT");
                return OperatorCommands.Answer(ControlSocket.Send(controlPath, $"resume {id} {r.GetValue(to)}{(r.GetValue(restart) ? " restart" : "")}".TrimEnd()));
            }
            if (r.GetValue(restart)) throw new UsageException("--restart: only with --resume ID and --to HOST:PORT");
            if (r.GetValue(recover) is { } lost)
            {
                if (r.GetValue(vmName) is not null) throw new UsageException("--recover: not with --vm (it serves a memory file here)");
                return Recover(r, o, lost, r.GetValue(to) ?? throw new UsageException("--recover: give the destination with --to HOST:PORT"), controlPath);
            }
            string target = r.GetValue(to) ?? throw new UsageException("--to HOST:PORT is required (or --resume ID)");
            if (r.GetValue(vmName) is { } vm)
                return OperatorCommands.MigrateVm(r, o, vm, target, r.GetResult(control) is { Implicit: false } ? controlPath : ControlSocket.DefaultAgentPath, args);
            return Migrate(r, o, target, controlPath);
        }));
        root.Add(migrate);

        var cancelId = new Argument<string?>("ID") { Description = "The migration to cancel: optional for a 'livemig migrate' (it runs one); required for a migration leaving an agent ('livemig migrate --vm').", Arity = ArgumentArity.ZeroOrOne };
        var cancelCmd = new Command("cancel", "Cancels the running 'livemig migrate', or with ID and an agent's --control a migration leaving that agent (any phase before the switch-over): the VM keeps running on the source, unthrottled.") { cancelId, control };
        cancelCmd.SetAction(r => Guard(r, o, () =>
        {
            string? id = r.GetValue(cancelId);
            if (id is not null && !Guid.TryParse(id, out _)) throw new UsageException($"cancel '{PeerText.Escape(id)}': expected a migration ID such as 3f2b...-...");
            return OperatorCommands.Answer(ControlSocket.Send(r.GetValue(control)!, $"cancel {id}".TrimEnd()));
        }));
        root.Add(cancelCmd);
        var rateArg = new Argument<string>("RATE") { Description = "New cap, e.g. 200MiB/s, 1Gbit, unlimited." };
        var setBw = new Command("set-bandwidth", "Changes the bandwidth cap of the running 'livemig migrate'; the new cap takes effect within a frame.") { rateArg, control };
        setBw.SetAction(r => Guard(r, o, () =>
        {
            string rate = r.GetValue(rateArg)!;
            if (!Units.TryParseRate(rate, out _)) throw new UsageException($"set-bandwidth '{PeerText.Escape(rate)}': {CliOptions.RateExpected}");
            return OperatorCommands.Answer(ControlSocket.Send(r.GetValue(control)!, "bandwidth " + rate));
        }));
        root.Add(setBw);
        root.Add(CertsCommand(o));
        root.Add(TraceCommands.Create());
        root.Add(SimulateCommand.Create());
        root.Add(ValidateCommand.Create());
        root.Add(PredictCommand.Create(o, (r, body) => Guard(r, o, body)));
        root.Add(MtdCommands.Create(o, (r, body) => Guard(r, o, body)));
        foreach (var c in OperatorCommands.All((r, body) => Guard(r, o, body))) root.Add(c);

        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            // One line naming the option (all the problems found, in that line), and exit code 2 like the other usage errors.
            Console.Error.WriteLine($"livemig: {string.Join("; ", parsed.Errors.Select(e => e.Message.TrimEnd('.')))}");
            return 2;
        }
        return parsed.Invoke();
    }

    private static Command CertsCommand(CliOptions o)
    {
        var outDir = new Option<string>("--out") { Description = "Directory to write ca.pem, ca.key and NAME.pem/NAME.key into.", Required = true, HelpName = "DIR" };
        var hosts = new Option<string?>("--hosts") { Description = "Comma-separated host names or IP addresses to make one certificate each for, carrying that one name (each is both a source and a destination identity).", HelpName = "A,B" };
        var host = new Option<string[]>("--host") { Description = "One certificate per use, for a host known by several names: NAME (its common name, which --trust checks, and its files' name) and more DNS names or IP addresses a source may reach it by, e.g. --host dst=dst.lan,10.0.0.2. Repeatable; with --hosts, one CA signs them all.", HelpName = "NAME[=ALIAS,...]" };
        var certs = new Command("certs", "Makes a small CA and host certificates (ECDSA P-256) for trying --tls out. A source checks that the destination's certificate carries the name it connects by (or --tls-hostname). Not for production: keep ca.key away from the hosts.") { outDir, hosts, host };
        certs.SetAction(r => Guard(r, o, () =>
        {
            var identities = CertificateHosts.Parse(r.GetValue(hosts), r.GetValue(host) ?? []);
            IReadOnlyList<string> written;
            try { written = Transport.Certificates.WriteCaAndHosts(r.GetValue(outDir)!, identities); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { throw new UsageException($"--out '{PeerText.Escape(r.GetValue(outDir))}': cannot write the certificates there: {e.Message.ReplaceLineEndings(" ")}"); }
            foreach (string f in written) Console.WriteLine(f);
            return 0;
        }));
        return certs;
    }

    private static int Guard(ParseResult r, CliOptions o, Func<int> body)
    {
        try { return body(); }
        catch (UsageException e)
        {
            Console.Error.WriteLine($"livemig: {e.Message}");
            return 2;
        }
        catch (MigrationFailedException e)
        {
            if (r.GetValue(o.Json)) Console.WriteLine(e.Report.ToJson());
            Console.Error.WriteLine(PeerLog.MigrationFailed(e));
            return 1;
        }
    }

    private static bool Interactive(ParseResult r, CliOptions o) => !r.GetValue(o.Json) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;

    private static void StartVm(BuiltInVm vm, VmConfig config, TimeSpan warmup, bool quiet, Action? afterStart = null)
    {
        if (vm.DirtyLogNote is not null) Console.Error.WriteLine($"livemig: note: {vm.DirtyLogNote}");
        vm.Start();
        afterStart?.Invoke();
        if (!quiet) Console.Error.WriteLine($"VM {config.Name}: {Units.Bytes(config.MemoryBytes)}, {config.Vcpus} vCPUs, workload {vm.Workload.Spec}, dirty log {vm.DirtyLog.Name}; warming up {warmup.TotalSeconds:0.#} s");
        Thread.Sleep(warmup);
    }

    internal static ClientReport ToClientReport(KvClientStats s) => new()
    {
        Requests = s.Count, Errors = s.Errors, Mismatches = s.Mismatches, P50Us = s.P50Us, P99Us = s.P99Us, MaxUs = s.MaxUs,
        ObservedDowntimeMs = Math.Max(s.MaxUs, s.LongestGapUs) / 1000.0,
    };

    private static MigrationReport RunWithProgress(ParseResult r, CliOptions o, Func<IMigrationObserver, MigrationReport> run)
    {
        if (r.GetValue(o.Json)) return run(new ObserverFanOut()); // nobody watches: the report says it all
        if (!Interactive(r, o)) return run(new LineProgress(Console.Out));
        MigrationReport? report = null;
        AnsiConsole.Progress().AutoClear(false).HideCompleted(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
            .Start(ctx => report = run(new SpectreProgress(ctx)));
        return report!;
    }

    private static int Finish(ParseResult r, CliOptions o, MigrationReport report) => Finish(r.GetValue(o.Json), report);

    /// <summary>Prints the report (JSON or tables) and returns the exit code: 0 only for a completed migration that was not found unverified; a failure's reason goes to stderr.</summary>
    internal static int Finish(bool json, MigrationReport report)
    {
        if (json) Console.WriteLine(report.ToJson());
        else ReportView.Render(report, AnsiConsole.Console);
        if (report.Outcome != "completed") Console.Error.WriteLine($"livemig: migration failed: {PeerText.Escape(report.Error)}");
        return report.Outcome == "completed" && report.Verified != false ? 0 : 1;
    }

    private static int Demo(ParseResult r, CliOptions o)
    {
        var options = o.MigrationOptions(r);
        if (QemuCommands.Spec(o, r, options) is { } qemu) return DemoQemu(r, o, qemu, options);
        var config = o.VmConfig(r, MachineMemory.TotalBytes / 2);
        bool json = r.GetValue(o.Json);
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        // For kv: the VM's network address, which moves to the destination at resume, and a client outside the VM.
        using var kvEndpoint = WorkloadSpec.Parse(config.Workload).Name == "kv" ? new KvEndpoint() : null;
        using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions
        {
            DirtyLog = config.DirtyLog,
            Security = options.Security,
            BeforeResume = v => kvEndpoint?.Attach((v as BuiltInVm)?.Workload as KvWorkload),
            PostCopy = new PostCopyDestinationOptions { Mode = CliOptions.ParseDemandPaging(r.GetValue(o.DemandPaging)!), Note = n => Console.Error.WriteLine($"livemig: note: {n}") },
        });
        listener.Arrived += a => arrived.TrySetResult(a);
        listener.Start();
        using var vm = BuiltInVm.Create(config);
        KvClient? client = null;
        if (kvEndpoint is not null)
        {
            kvEndpoint.Attach((KvWorkload)vm.Workload);
            client = new KvClient(kvEndpoint.EndPoint, new KvClientOptions { Seed = config.Seed, MaxValueLength = Math.Min(256, ((KvWorkload)vm.Workload).ValueSize) });
        }
        StartVm(vm, config, o.WarmupTime(r), json, () => client?.Start());
        if (!json) Console.Error.WriteLine($"migrating to the destination agent on 127.0.0.1:{listener.Port}");
        using var cancel = CancelOnCtrlC();
        long migrationStart = System.Diagnostics.Stopwatch.GetTimestamp();
        var report = RunWithProgress(r, o, obs => Migrations.MigrateTo(vm, options, obs, "127.0.0.1", listener.Port, cancel.Token));
        if (!arrived.Task.Wait(TimeSpan.FromSeconds(30))) throw new UsageException("destination did not report the arrival");
        long migrationEnd = System.Diagnostics.Stopwatch.GetTimestamp();
        var dest = arrived.Task.Result.Vm;
        // The destination's view of post-copy: how it fetched pages, and what its vCPUs waited.
        if (options.Strategy != MigrationStrategy.PreCopy) report = report with { DemandPaging = arrived.Task.Result.Report.DemandPaging };
        // The VM keeps running on the destination: let it work, then check its invariant there.
        long ops = dest.Operations, since = System.Diagnostics.Stopwatch.GetTimestamp();
        Thread.Sleep(200);
        // Both sides' steps of the switch-over in one report (same process, same clock).
        if (report.DowntimeBreakdown is { } db && arrived.Task.Result.Report.DowntimeBreakdown is { } dd)
            report = report with { DowntimeBreakdown = db with { Destination = dd.Destination, DestinationJitMs = dd.DestinationJitMs, VcpuWakeMs = (dest as BuiltInVm)?.ResumeToFirstRun?.TotalMilliseconds } };
        if (client is not null)
        {
            // Let the client see the VM at work on the destination, then report what it saw throughout.
            Thread.Sleep(300);
            var stats = client.StopAsync().GetAwaiter().GetResult();
            client.Dispose();
            report = report with
            {
                Client = ToClientReport(stats),
                ClientPhases = new ClientPhases
                {
                    Before = ToClientReport(client.GetStats(to: migrationStart)),
                    During = ToClientReport(client.GetStats(migrationStart, migrationEnd)),
                    After = ToClientReport(client.GetStats(from: migrationEnd)),
                },
            };
            if (stats.Failure is not null && !json) Console.Error.WriteLine($"kv client: {stats.Failure}");
        }
        dest.Pause();
        string? broken = dest.CheckInvariant();
        if (!json) Console.Error.WriteLine(broken is null
            ? $"destination VM is running: {dest.Operations - ops:N0} operations in its first {System.Diagnostics.Stopwatch.GetElapsedTime(since).TotalMilliseconds:0} ms there; workload invariant holds"
            : $"destination VM: workload invariant BROKEN: {broken}");
        int rc = broken is null ? Finish(r, o, report) : 1;
        return report.Client is { Errors: > 0 } or { Mismatches: > 0 } ? 1 : rc;
    }

    /// <summary>
    /// <c>demo --qemu IMAGE</c>: a QEMU guest here, a destination agent for it in this process
    /// (allowed the image's directory), the migration over loopback, and then the guest's own
    /// report from the destination: the boot-sector guest counts the stale or lost pages it finds.
    /// </summary>
    private static int DemoQemu(ParseResult r, CliOptions o, Qemu.QemuVmSpec spec, MigrationOptions options)
    {
        bool json = r.GetValue(o.Json);
        var arrived = new TaskCompletionSource<ArrivedVm>(TaskCreationOptions.RunContinuationsAsynchronously);
        var factory = new Qemu.QemuVmFactory(new Qemu.QemuHostOptions { AllowedImageDirectories = [.. spec.Files.Select(f => Path.GetDirectoryName(f)!).Distinct()] });
        using var listener = new MigrationListener(IPAddress.Loopback, 0, new DestinationOptions { Security = options.Security, VmFactories = [factory] });
        listener.Arrived += a => arrived.TrySetResult(a);
        listener.Start();
        using var vm = QemuCommands.Start(CliOptions.ParseName(r.GetValue(o.Name)), spec, o.WarmupTime(r), json);
        string sourceLog = vm.SerialLog;
        var before = Qemu.BootSectorSerial.Last(Qemu.BootSectorSerial.Read(sourceLog));
        if (!json) Console.Error.WriteLine($"migrating to the destination agent on 127.0.0.1:{listener.Port}");
        using var cancel = CancelOnCtrlC();
        var report = RunWithProgress(r, o, obs => Migrations.MigrateTo(vm, options, obs, "127.0.0.1", listener.Port, cancel.Token));
        if (report.Outcome != "completed") return Finish(r, o, report);
        if (!arrived.Task.Wait(TimeSpan.FromSeconds(30))) throw new UsageException("destination did not report the arrival");
        using var dest = arrived.Task.Result.Vm;
        // Post-copy: how the destination caught QEMU's faults (its report; the fault figures came in PostCopyDone).
        if (arrived.Task.Result.Report.DemandPaging is { } paging) report = report with { DemandPaging = paging };
        // Both sides' steps of the switch-over in one report (same process, same clock).
        if (report.DowntimeBreakdown is { } db && arrived.Task.Result.Report.DowntimeBreakdown is { } dd)
            report = report with { DowntimeBreakdown = db with { Destination = dd.Destination, DestinationJitMs = dd.DestinationJitMs } };
        // Let the guest run at the destination for a moment, then read its own verdict there.
        Thread.Sleep(TimeSpan.FromSeconds(2));
        string? broken = dest.CheckInvariant();
        if (!json && QemuCommands.Forwards(((Qemu.QemuVm)dest).Process) is { } forwards) Console.Error.WriteLine($"destination guest: {forwards}");
        var there = Qemu.BootSectorSerial.Last(Qemu.BootSectorSerial.Read(((Qemu.QemuVm)dest).SerialLog));
        if (!json) Console.Error.WriteLine(there is { } t
            ? $"destination guest: {t.Passes} passes (source: {before?.Passes.ToString() ?? "?"} at warm-up), {t.Errors} stale or lost pages found{(broken is null ? "" : " — BROKEN")}"
            : spec.Kernel is not null ? $"destination guest: running; its console is in {((Qemu.QemuVm)dest).SerialLog}"
            : "destination guest: no report on its serial port yet (not the boot-sector guest?)");
        int rc = Finish(r, o, report);
        return broken is null ? rc : 1;
    }

    /// <summary>A restarted source: serves a post-copy destination that waits for its dead source the pages it lacks, from the memory file.</summary>
    private static int Recover(ParseResult r, CliOptions o, string idText, string target, string controlPath)
    {
        if (!Guid.TryParse(idText, out var id)) throw new UsageException($"--recover '{PeerText.Escape(idText)}': expected a migration ID such as 3f2b...-... (printed by 'livemig migrate')");
        string file = r.GetValue(o.MemoryFile) ?? throw new UsageException("--recover: give the first source's memory with --memory-file PATH");
        foreach (var opt in o.VmOptions)
            if (opt != o.MemoryFile && r.GetResult(opt) is { Implicit: false }) throw new UsageException($"{opt.Name}: not with --recover: the VM is the one in the memory file");
        if (!File.Exists(file)) throw new UsageException($"--memory-file {file}: no such file");
        var (host, port) = CliOptions.ParseTarget(target);
        var options = o.MigrationOptions(r);
        using var cancel = CancelOnCtrlC();
        using var controlSocket = ControlSocket.Open(controlPath); // resume, destroy, status: as for the first source
        o.PrintWarnings(Console.Error);
        var registry = new VmRegistry();
        var control = new MigrateControl(registry, cancel);
        controlSocket.Handler = control.Handle;
        MigrationReport report;
        using (var vm = new PausedMemoryVm("recovered", Memory.GuestMemory.Open(file)))
        {
            var observers = new ObserverFanOut();
            OutgoingMigration migration;
            try { migration = OutgoingMigration.Recover(id, vm, options, observers); }
            catch (ArgumentException e) { throw new UsageException("--recover: " + e.Message); }
            var progress = new MigrationProgress(id, "source", "postcopy", vm.Name, vm.Memory.Size, $"{host}:{port}") { BandwidthLimit = () => migration.Limiter.BytesPerSecond };
            observers.Add(progress);
            registry.Track(progress);
            control.Migration = migration;
            Console.Error.WriteLine($"recovering migration {id} to {host}:{port} from {file}");
            report = RunWithProgress(r, o, obs => { observers.Add(obs); return migration.MigrateTo(host, port, cancel.Token); });
        }
        if (report.Outcome == "completed") File.Delete(file); // the VM is whole at the destination
        return Finish(r, o, report);
    }

    private static int Migrate(ParseResult r, CliOptions o, string target, string controlPath)
    {
        var (host, port) = CliOptions.ParseTarget(target);
        var options = o.MigrationOptions(r);
        var qemu = QemuCommands.Spec(o, r, options);
        var config = qemu is null ? o.VmConfig(r) : null;
        using var cancel = CancelOnCtrlC();
        // Taken before the VM starts: a path another process answers on is refused at once.
        using var controlSocket = ControlSocket.Open(controlPath);
        o.PrintWarnings(Console.Error);
        var registry = new VmRegistry(); // what 'livemig list' and 'status' see here: this VM and its migration
        var control = new MigrateControl(registry, cancel);
        controlSocket.Handler = control.Handle;
        using IVirtualMachine vm = qemu is null ? BuiltInVm.Create(config!) : QemuCommands.Start(CliOptions.ParseName(r.GetValue(o.Name)), qemu, o.WarmupTime(r), r.GetValue(o.Json));
        registry.Add(vm);
        // The control socket needs the migration (its rate limiter, its reconnect target), so the
        // migration exists before its observer (the progress display) does: a fan-out bridges the
        // two. It exists before the warm-up too: set-bandwidth, status and cancel act during it.
        var observers = new ObserverFanOut();
        var migration = new OutgoingMigration(vm, options, observers);
        control.Migration = migration;
        if (vm is BuiltInVm builtIn) StartVm(builtIn, config!, o.WarmupTime(r), r.GetValue(o.Json));
        var progress = new MigrationProgress(migration.MigrationId, "source", Migrations.Name(options.Strategy), vm.Name, vm.Memory.Size, $"{host}:{port}")
        {
            BandwidthLimit = () => migration.Limiter.BytesPerSecond,
        };
        observers.Add(progress);
        registry.Track(progress);
        Console.Error.WriteLine($"migration {migration.MigrationId} to {host}:{port} (VM {vm.Name})"); // the ID 'livemig migrate --resume' and 'status' name
        var report = RunWithProgress(r, o, obs => { observers.Add(obs); return migration.MigrateTo(host, port, cancel.Token); });
        return Finish(r, o, report);
    }

    private static int Listen(ParseResult r, CliOptions o, ListenerOptions lo, int port, string bind, bool once, string? maxMemory, Transport.ChannelSecurity security, string? prealloc, TimeSpan resumeWindow, string? controlPath, IReadOnlyList<IVmFactory> factories)
    {
        Memory.MemoryPool? pool = null;
        if (prealloc is not null)
        {
            string[] parts = prealloc.ToLowerInvariant().Split('x');
            int count = 1;
            if (parts.Length > 2 || !Units.TryParseBytes(parts[0], out long size) || size < 64L << 20 || size % 4096 != 0 || (parts.Length == 2 && (!int.TryParse(parts[1], out count) || count < 1 || count > 64)))
                throw new UsageException($"--prealloc '{prealloc}': expected SIZE or SIZExCOUNT, e.g. 4GiB or 1GiBx4 (64MiB or more, 1 to 64 regions)");
            if (size * count > MachineMemory.TotalBytes) throw new UsageException($"--prealloc {prealloc}: more than this machine's memory ({Units.Bytes(MachineMemory.TotalBytes)})");
            pool = new Memory.MemoryPool(size, count);
            Console.Error.WriteLine($"preparing {count} × {Units.Bytes(size)} of guest memory in the background");
        }
        using var _pool = pool;
        if (port is < 0 or > 65535) throw new UsageException($"--port {port}: must be 0..65535");
        if (!IPAddress.TryParse(bind, out var address)) throw new UsageException($"--bind '{bind}': not an IP address");
        var (budget, max) = lo.Memory(r, maxMemory);
        bool json = r.GetValue(o.Json);
        var done = new TaskCompletionSource<int>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var listener = new MigrationListener(address, port, lo.Apply(r, new DestinationOptions
        {
            DirtyLog = CliOptions.ParseDirtyLog(r.GetValue(o.DirtyLog)!), MaxMemoryBytes = max, MemoryBudget = budget, Security = security, MemoryPool = pool, ResumeWindow = resumeWindow, VmFactories = factories,
            PostCopy = new PostCopyDestinationOptions { Mode = CliOptions.ParseDemandPaging(r.GetValue(o.DemandPaging)!), Note = n => Console.Error.WriteLine($"livemig: note: {n}") },
        }));
        listener.Dropped += line => Console.Error.WriteLine($"livemig: {line}");
        listener.Arrived += a =>
        {
            Console.Error.WriteLine(PeerLog.Arrived(a));
            if (!once) return;
            if (json) Console.WriteLine(a.Report.ToJson()); else ReportView.Render(a.Report, AnsiConsole.Console);
            done.TrySetResult(0);
        };
        listener.Failed += f =>
        {
            Console.Error.WriteLine(PeerLog.IncomingFailed(f));
            if (!once) return;
            if (json) Console.WriteLine(f.Report.ToJson());
            done.TrySetResult(1);
        };
        try { listener.Start(); }
        catch (System.Net.Sockets.SocketException e) { throw new UsageException($"--port {port}: cannot listen on {bind}:{port}: {e.Message}"); }
        using var controlSocket = ControlSocket.Open(controlPath ?? ControlSocket.AgentPath(listener.Port));
        o.PrintWarnings(Console.Error);
        controlSocket.Handler = new AgentControl(listener.Registry, Console.Error, listener.Sessions).Handle;
        Console.Error.WriteLine($"listening on {bind}:{listener.Port} (control socket {controlSocket.Path})");
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; done.TrySetResult(130); };
        // A service manager's stop (SIGTERM) ends the agent as Ctrl-C does: its VMs and its control socket go cleanly.
        using var term = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, c => { c.Cancel = true; done.TrySetResult(143); });
        return done.Task.GetAwaiter().GetResult();
    }

    private static CancellationTokenSource CancelOnCtrlC()
    {
        var cts = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; cts.Cancel(); };
        return cts;
    }
}
