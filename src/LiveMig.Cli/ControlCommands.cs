using System.CommandLine;
using System.Text.Json;
using LiveMig.Engine;
using LiveMig.Protocol;
using LiveMig.Reporting;

namespace LiveMig.Cli;

/// <summary>
/// What the control sockets answer (docs/architecture.md, "Control sockets"). Every command is
/// one line; the answer is one line — <c>ok: …</c>, <c>error: …</c>, or a JSON object — except
/// <c>migrate</c> on an agent, which streams progress lines and ends with <c>report JSON</c>.
/// </summary>
internal static class ControlCommands
{
    /// <summary><c>list</c> and <c>status ID</c>, which both kinds of control socket answer from their registry.</summary>
    public static bool TryAnswerQuery(VmRegistry registry, string verb, string arg, TextWriter w)
    {
        switch (verb)
        {
            case "list":
                w.WriteLine(registry.List().ToJson());
                return true;
            case "status":
                if (!Guid.TryParse(arg, out var id)) w.WriteLine($"error: status '{PeerText.Escape(arg)}': expected a migration ID");
                else w.WriteLine(registry.Status(id)?.ToJson() ?? $"error: no migration {id} in progress here");
                return true;
            default:
                return false;
        }
    }

    public static (string Verb, string Arg) Split(string line)
    {
        string[] parts = line.Split(' ', 2, StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        return (parts.FirstOrDefault() ?? "", parts.Length > 1 ? parts[1] : "");
    }
}

/// <summary>The control socket of a running <c>livemig migrate</c>: <c>cancel [ID]</c>, <c>bandwidth RATE</c>, <c>resume ID [HOST:PORT [restart]]</c>, <c>destroy ID</c>, <c>list</c>, <c>status ID</c>.</summary>
internal sealed class MigrateControl(VmRegistry registry, CancellationTokenSource cancel)
{
    private OutgoingMigration? _migration;
    private long? _earlyRate;
    private readonly Lock _rateLock = new();

    /// <summary>
    /// The migration, once made (commands before then act on what exists: cancel cancels it
    /// before it starts; a bandwidth cap given while the VM is still being made applies from the start).
    /// </summary>
    public OutgoingMigration? Migration
    {
        get => _migration;
        set
        {
            lock (_rateLock)
            {
                _migration = value;
                if (value is not null && _earlyRate is { } rate) value.Limiter.BytesPerSecond = rate;
            }
        }
    }

    public void Handle(string line, TextWriter w)
    {
        string answer = Answer(line, w);
        if (answer.Length > 0) w.WriteLine(answer);
    }

    /// <summary>The one-line answer; empty when a query wrote its own.</summary>
    private string Answer(string line, TextWriter w)
    {
        var (verb, arg) = ControlCommands.Split(line);
        if (ControlCommands.TryAnswerQuery(registry, verb, arg, w)) return "";
        var m = Migration;
        switch (verb)
        {
            case "cancel":
                if (arg.Length > 0 && m is not null && arg != m.MigrationId.ToString()) return $"error: this process migrates {m.MigrationId}, not '{PeerText.Escape(arg)}'";
                if (m is not null) return m.Cancel();
                cancel.Cancel();
                return "ok: cancelling; the VM keeps running on the source";
            case "bandwidth" when arg.Length > 0:
                if (!Units.TryParseRate(arg, out long rate)) return $"error: bandwidth '{PeerText.Escape(arg)}': {CliOptions.RateExpected}";
                lock (_rateLock)
                {
                    if (_migration is null) _earlyRate = rate; // applied when the migration is made
                    else _migration.Limiter.BytesPerSecond = rate;
                }
                return $"ok: bandwidth {(rate == 0 ? "unlimited" : Units.Rate(rate))}";
            case "resume" when arg.Length > 0:
                return m is null ? "error: the migration has not started yet" : Resume(m, arg);
            case "destroy" when arg.Length > 0:
                return m is null ? "error: the migration has not started yet" : Destroy(m, arg);
            default:
                return $"error: unknown command '{PeerText.Escape(line)}' (cancel [ID], bandwidth RATE, resume ID [HOST:PORT [restart]], destroy ID, list, status ID)";
        }
    }

    /// <summary>
    /// <c>resume ID [HOST:PORT]</c>: reconnect now (to a new address if given) instead of waiting out the back-off.
    /// <c>resume ID HOST:PORT restart</c>: after a post-copy switch whose destination is lost, start over from the paused VM.
    /// </summary>
    private static string Resume(OutgoingMigration m, string args)
    {
        string[] a = args.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (!Guid.TryParse(a[0], out var id) || id != m.MigrationId) return $"error: this process migrates {m.MigrationId}, not '{PeerText.Escape(a[0])}'";
        if (m.Target is not { } target) return "error: the migration has not connected yet";
        (string Host, int Port)? next = null;
        if (a.Length > 1)
        {
            try { next = CliOptions.ParseTarget(a[1]); }
            catch (UsageException e) { return "error: " + e.Message; }
        }
        if (a.Length > 2 && a[2] == "restart")
        {
            if (next is not { } n) return "error: restart needs the new destination HOST:PORT";
            target.Restart(n.Host, n.Port);
            return $"ok: starting over from the paused VM to {n.Host}:{n.Port} (if the migration is post-copy paused)";
        }
        bool waiting = target.Reconnecting;
        target.RetryNow(next?.Host, next?.Port);
        var (h, p) = target.Current;
        return waiting ? $"ok: reconnecting now to {h}:{p}" : $"ok: the migration is connected; a drop will reconnect to {h}:{p}";
    }

    /// <summary><c>destroy ID</c>: after a post-copy switch whose destination cannot be recovered, discard the paused VM (an operator's explicit decision).</summary>
    private static string Destroy(OutgoingMigration m, string arg)
    {
        if (!Guid.TryParse(arg, out var id) || id != m.MigrationId) return $"error: this process migrates {m.MigrationId}, not '{PeerText.Escape(arg)}'";
        if (m.Target is not { } target) return "error: the migration has not connected yet";
        target.Abandon();
        return "ok: discarding the paused VM if the migration is post-copy paused (before the switch-over use 'livemig cancel')";
    }
}

/// <summary>
/// The control socket of an agent (<c>livemig listen</c>): <c>list</c>, <c>status ID</c>,
/// <c>stop NAME</c>, <c>start NAME</c>, <c>destroy NAME</c> (or <c>destroy ID</c>: a post-copy VM waiting for its lost source), <c>cancel ID</c> (a migration
/// leaving this agent), and <c>migrate {"vm":…,"to":…,"args":[…]}</c>, which migrates a VM
/// held here onward with <c>livemig migrate</c>'s options and streams progress, then the report.
/// </summary>
internal sealed class AgentControl(VmRegistry registry, TextWriter log, DestinationSessions? sessions = null)
{
    public void Handle(string line, TextWriter w)
    {
        var (verb, arg) = ControlCommands.Split(line);
        if (ControlCommands.TryAnswerQuery(registry, verb, arg, w)) return;
        try
        {
            switch (verb)
            {
                case "stop" when arg.Length > 0:
                    registry.Stop(arg);
                    w.WriteLine($"ok: VM {PeerText.Escape(arg)} stopped (vCPUs paused, memory kept; 'livemig start {PeerText.Escape(arg)}' resumes it)");
                    break;
                case "start" when arg.Length > 0:
                    registry.Start(arg);
                    w.WriteLine($"ok: VM {PeerText.Escape(arg)} running");
                    break;
                case "destroy" when Guid.TryParse(arg, out var lost) && sessions is not null:
                    // A post-copy VM whose source died after the switch waits for it for ever; only an operator ends that.
                    if (sessions.DiscardPostCopy(lost, "livemig destroy")) w.WriteLine($"ok: discarding the VM of migration {lost}, which waited for its source; the report and the log say what is lost");
                    else w.WriteLine($"error: no post-copy migration {lost} is waiting for its source here (a VM that arrived is destroyed by its name)");
                    break;
                case "destroy" when arg.Length > 0:
                    long bytes = registry.Find(arg)?.Memory.Size ?? 0;
                    registry.Destroy(arg);
                    log.WriteLine($"VM {PeerText.Escape(arg)} destroyed ({Units.Bytes(bytes)} freed)");
                    w.WriteLine($"ok: VM {PeerText.Escape(arg)} destroyed, {Units.Bytes(bytes)} of guest memory freed");
                    break;
                case "cancel" when Guid.TryParse(arg, out var id):
                    w.WriteLine(registry.Outgoing(id)?.Cancel() ?? $"error: no migration {id} is leaving this agent (an incoming migration is cancelled at its source)");
                    break;
                case "migrate" when arg.Length > 0:
                    MigrateOnward(arg, w);
                    break;
                default:
                    w.WriteLine($"error: unknown command '{PeerText.Escape(line)}' (list, status ID, stop NAME, start NAME, destroy NAME|ID, cancel ID, migrate REQUEST)");
                    break;
            }
        }
        catch (InvalidOperationException e) { w.WriteLine("error: " + PeerText.Escape(e.Message)); }
        catch (UsageException e) { w.WriteLine("error: " + e.Message); }
    }

    private void MigrateOnward(string json, TextWriter w)
    {
        var request = OnwardRequest.Parse(json);
        var options = request.Options(log);
        var (host, port) = CliOptions.ParseTarget(request.To);
        var peer = new LinesToPeer(w);
        string name = PeerText.Escape(request.Vm);
        try
        {
            var report = registry.MigrateAway(request.Vm, options, host, port, new LineProgress(peer), m =>
            {
                log.WriteLine($"VM {name} leaving for {host}:{port} (migration {m.MigrationId})");
                peer.WriteLine($"ok: migration {m.MigrationId} of VM {name} to {host}:{port}");
            });
            log.WriteLine($"VM {name} migrated to {host}:{port}: it runs there now, {Units.Bytes(report.MemoryBytes)} freed here");
            peer.WriteLine("report " + report.ToJson());
        }
        catch (MigrationFailedException e)
        {
            log.WriteLine($"VM {name}: migration to {host}:{port} failed: {PeerText.Escape(e.Message)}");
            peer.WriteLine("report " + e.Report.ToJson());
        }
    }
}

/// <summary>
/// <c>migrate --vm NAME --to HOST:PORT [options]</c> as the agent's control socket receives it:
/// the VM, the target and <c>livemig migrate</c>'s own option words, parsed at the agent by
/// the same code as on the command line (so every option means the same).
/// </summary>
internal sealed record OnwardRequest(string Vm, string To, string[] Args)
{
    public string ToJson()
    {
        using var buffer = new MemoryStream();
        using (var j = new Utf8JsonWriter(buffer))
        {
            j.WriteStartObject();
            j.WriteString("vm", Vm);
            j.WriteString("to", To);
            j.WriteStartArray("args");
            foreach (string a in Args) j.WriteStringValue(a);
            j.WriteEndArray();
            j.WriteEndObject();
        }
        return System.Text.Encoding.UTF8.GetString(buffer.ToArray());
    }

    public static OnwardRequest Parse(string json)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            var root = doc.RootElement;
            return new OnwardRequest(root.GetProperty("vm").GetString() ?? "", root.GetProperty("to").GetString() ?? "",
                [.. root.GetProperty("args").EnumerateArray().Select(a => a.GetString() ?? "")]);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new UsageException($"migrate request: expected {{\"vm\":NAME,\"to\":HOST:PORT,\"args\":[...]}} ({e.Message.ReplaceLineEndings(" ")})");
        }
    }

    /// <summary>The migration options the words ask for, checked as <c>livemig migrate</c> checks them.</summary>
    public MigrationOptions Options(TextWriter log)
    {
        var o = new CliOptions();
        var cmd = new Command("migrate");
        o.AddMigrationOptions(cmd);
        var r = cmd.Parse(Args);
        if (r.Errors.Count > 0) throw new UsageException(r.Errors[0].Message);
        var options = o.MigrationOptions(r);
        o.PrintWarnings(log);
        return options;
    }
}
