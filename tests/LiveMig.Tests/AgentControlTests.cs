using LiveMig.Cli;
using LiveMig.Engine;

namespace LiveMig.Tests;

/// <summary>The agent's control commands answered in one line, without a listener process.</summary>
public class AgentControlTests
{
    private static string Answer(AgentControl control, string line)
    {
        var w = new StringWriter();
        control.Handle(line, w);
        return w.ToString().Trim();
    }

    [Fact]
    public void Destroy_by_migration_id_refuses_when_no_post_copy_vm_waits_for_its_source()
    {
        var control = new AgentControl(new VmRegistry(), TextWriter.Null, new DestinationSessions());
        Guid id = Guid.NewGuid();
        Assert.Equal($"error: no post-copy migration {id} is waiting for its source here (a VM that arrived is destroyed by its name)", Answer(control, $"destroy {id}"));
        Assert.StartsWith("error: no VM named 'web1' here", Answer(control, "destroy web1"));
    }

    [Fact]
    public void Unknown_commands_are_named_escaped_with_the_list_of_commands()
    {
        var control = new AgentControl(new VmRegistry(), TextWriter.Null, new DestinationSessions());
        string answer = Answer(control, "reboot \u001b[2J now");
        Assert.StartsWith("error: unknown command 'reboot ", answer);
        Assert.DoesNotContain('\u001b', answer);
        Assert.Contains("destroy NAME|ID", answer);
    }
}
