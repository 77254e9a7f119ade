using System.CommandLine;
using LiveMig.Protocol;
using LiveMig.Reporting;
using Spectre.Console;

namespace LiveMig.Cli;

/// <summary>
/// The commands that manage an agent's VMs and query migrations through a control socket:
/// <c>list</c>, <c>status</c>, <c>stop</c>, <c>start</c>, <c>destroy</c>, and the client side
/// of <c>migrate --vm</c>.
/// </summary>
internal static class OperatorCommands
{
    private static Option<string> AgentControl() => new("--control")
    {
        Description = $"The agent's control socket ('livemig listen --control'; an agent on port P uses {ControlSocket.AgentPath(0).Replace("-0.sock", "-P.sock")}).",
        DefaultValueFactory = _ => ControlSocket.DefaultAgentPath, HelpName = "PATH",
    };

    private static Option<bool> Json() => new("--json") { Description = "Print the answer as one JSON object on stdout (a stable contract: docs/report.md, \"Status and list\")." };

    public static IEnumerable<Command> All(Func<ParseResult, Func<int>, int> guard)
    {
        yield return List(guard);
        yield return Status(guard);
        yield return VmCommand("stop", "Stops (pauses) the vCPUs of a VM on the agent; its memory stays. 'livemig start' resumes it.", guard);
        yield return VmCommand("start", "Resumes the vCPUs of a VM stopped with 'livemig stop'.", guard);
        yield return VmCommand("destroy", "Ends a VM on the agent and frees its memory and vCPU threads. Not while it is migrating (cancel that first). Given a migration ID instead of a VM name, after a post-copy switch whose other side is lost for good: with a 'livemig migrate''s --control (the default when given an ID: " + ControlSocket.DefaultMigratePath + "), discards the source's paused VM; with an agent's --control, discards the VM that waits there for its dead source.", guard);
    }

    private static Command List(Func<ParseResult, Func<int>, int> guard)
    {
        var control = AgentControl();
        control.Description += " Also answers for a running 'livemig migrate' given its --control.";
        var json = Json();
        var list = new Command("list", "Lists the VMs on an agent (name, kind, size, state, since when, the migration that brought each) and its migrations in progress (ID, role, strategy, phase, since when).") { control, json };
        list.SetAction(r => guard(r, () =>
        {
            string answer = ControlSocket.Send(r.GetValue(control)!, "list");
            if (!answer.StartsWith('{')) return Failed(answer);
            if (r.GetValue(json)) Console.WriteLine(answer);
            else StatusView.RenderList(AgentListing.FromJson(answer), AnsiConsole.Console, DateTimeOffset.Now);
            return 0;
        }));
        return list;
    }

    private static Command Status(Func<ParseResult, Func<int>, int> guard)
    {
        var id = new Argument<string>("ID") { Description = "The migration ID ('livemig list' shows them; 'livemig migrate' prints its own)." };
        var control = new Option<string?>("--control")
        {
            Description = $"Where to ask: an agent's control socket or a running 'livemig migrate''s. Default: the agent on port 7480 ({ControlSocket.DefaultAgentPath}), then {ControlSocket.DefaultMigratePath}.",
            HelpName = "PATH",
        };
        var json = Json();
        var status = new Command("status", "Shows the live figures of a migration in progress, as QEMU's query-migrate does: phase, round, pages remaining, dirty rate, bandwidth, expected downtime, bytes so far, elapsed.") { id, control, json };
        status.SetAction(r => guard(r, () =>
        {
            string text = r.GetValue(id)!;
            if (!Guid.TryParse(text, out var guid)) throw new UsageException($"status '{PeerText.Escape(text)}': expected a migration ID such as 3f2b...-... ('livemig list' shows them)");
            string answer = AskStatus(r.GetValue(control), guid);
            if (!answer.StartsWith('{')) return Failed(answer);
            if (r.GetValue(json)) Console.WriteLine(answer);
            else StatusView.RenderStatus(MigrationStatus.FromJson(answer), AnsiConsole.Console);
            return 0;
        }));
        return status;
    }

    /// <summary>Asks the socket given, or else the default agent and then the default migrate socket, whichever knows the migration.</summary>
    private static string AskStatus(string? control, Guid id)
    {
        if (control is not null) return ControlSocket.Send(control, $"status {id}");
        string? last = null;
        foreach (string path in new[] { ControlSocket.DefaultAgentPath, ControlSocket.DefaultMigratePath })
        {
            if (!File.Exists(path)) continue;
            try { last = ControlSocket.Send(path, $"status {id}"); }
            catch (UsageException) { continue; }
            if (last.StartsWith('{')) return last;
        }
        return last ?? $"error: no agent or migrate answers at {ControlSocket.DefaultAgentPath} or {ControlSocket.DefaultMigratePath}; give --control PATH";
    }

    private static Command VmCommand(string verb, string description, Func<ParseResult, Func<int>, int> guard)
    {
        var name = new Argument<string>("VM") { Description = "The VM's name ('livemig list' shows them)." };
        var control = AgentControl();
        var cmd = new Command(verb, description) { name, control };
        cmd.SetAction(r => guard(r, () =>
        {
            string vm = r.GetValue(name)!;
            if (vm.Length == 0 || vm.Any(char.IsControl)) throw new UsageException($"{verb} '{PeerText.Escape(vm)}': expected a VM name");
            // A migration ID names a post-copy paused VM held by a 'livemig migrate', which has its own socket.
            string path = verb == "destroy" && Guid.TryParse(vm, out _) && r.GetResult(control) is null or { Implicit: true } ? ControlSocket.DefaultMigratePath : r.GetValue(control)!;
            return Answer(ControlSocket.Send(path, $"{verb} {vm}"));
        }));
        return cmd;
    }

    /// <summary>An answer line printed: 0 for <c>ok</c>, 1 otherwise (the agent's refusal is not a usage error).</summary>
    public static int Answer(string reply)
    {
        if (reply.StartsWith("ok", StringComparison.Ordinal))
        {
            Console.WriteLine(PeerText.Escape(reply));
            return 0;
        }
        return Failed(reply);
    }

    private static int Failed(string reply)
    {
        Console.Error.WriteLine("livemig: " + PeerText.Escape(reply.StartsWith("error: ", StringComparison.Ordinal) ? reply["error: ".Length..] : reply));
        return 1;
    }

    /// <summary>
    /// <c>migrate --vm NAME --to HOST:PORT [options]</c>: the agent at <paramref name="control"/>
    /// migrates its VM NAME with these options; this process shows its progress and report and
    /// exits as <c>migrate</c> does (Ctrl-C asks the agent to cancel).
    /// </summary>
    public static int MigrateVm(ParseResult r, CliOptions o, string vm, string to, string control, string[] args)
    {
        foreach (var opt in o.VmOptions)
            if (r.GetResult(opt) is { Implicit: false }) throw new UsageException($"{opt.Name}: not with --vm: the VM runs on the agent already");
        if (vm.Length == 0 || vm.Any(char.IsControl)) throw new UsageException($"--vm '{PeerText.Escape(vm)}': expected a VM name");
        CliOptions.ParseTarget(to);
        o.MigrationOptions(r); // the agent parses them again; bad ones are refused here first, exit code 2
        var request = new OnwardRequest(vm, to, ForwardedArgs(args));
        bool json = r.GetValue(o.Json);
        string? id = null;
        Console.CancelKeyPress += (_, e) =>
        {
            e.Cancel = true;
            if (id is not null) Console.Error.WriteLine("livemig: " + PeerText.Escape(ControlSocket.Send(control, $"cancel {id}")));
        };
        foreach (string line in ControlSocket.Converse(control, "migrate " + request.ToJson()))
        {
            if (line.StartsWith("error: ", StringComparison.Ordinal)) return Failed(line);
            if (line.StartsWith("report ", StringComparison.Ordinal)) return Program.Finish(json, MigrationReport.FromJson(line["report ".Length..]));
            if (line.StartsWith("ok: migration ", StringComparison.Ordinal))
            {
                id = line.Split(' ')[2];
                o.PrintWarnings(Console.Error); // e.g. no --tls: once the agent took the request
                Console.Error.WriteLine($"migration {id} to {to} (VM {PeerText.Escape(vm)}, from the agent)"); // the ID 'livemig cancel' and 'status' name
            }
            else if (!json) Console.WriteLine(PeerText.Escape(line));
        }
        Console.Error.WriteLine("livemig: the agent closed the control connection before the migration ended; 'livemig list' shows where the VM is");
        return 1;
    }

    /// <summary>The migration options of this command line for the agent: without --vm, --to and --control, file paths made absolute (the agent's working directory is not ours).</summary>
    private static string[] ForwardedArgs(string[] args)
    {
        string[] dropped = ["--vm", "--to", "--control"], paths = ["--cert", "--key", "--ca", "--psk-file"];
        var result = new List<string>();
        for (int i = Array.IndexOf(args, "migrate") + 1; i < args.Length; i++)
        {
            string a = args[i];
            string name = a.Split('=', 2)[0];
            bool inline = a.Contains('=');
            if (dropped.Contains(name)) { if (!inline) i++; continue; }
            if (paths.Contains(name))
            {
                string? value = inline ? a.Split('=', 2)[1] : i + 1 < args.Length ? args[++i] : null;
                result.Add(name);
                if (value is not null) result.Add(Path.GetFullPath(value));
                continue;
            }
            result.Add(a);
        }
        return [.. result];
    }
}
