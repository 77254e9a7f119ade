using System.CommandLine;

namespace LiveMig.Cli;

/// <summary><c>livemig trace show FILE</c>.</summary>
internal static class TraceShow
{
    public static Command Command()
    {
        var file = new Argument<string>("FILE") { Description = "A trace written by 'livemig trace record'." };
        var show = new Command("show", "Describes a trace: size, duration, dirty rate over time, writable working set, content mix.") { file };
        show.SetAction(r => TraceCommands.Guard(() => 0));
        return show;
    }
}
