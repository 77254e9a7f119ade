using System.Runtime.InteropServices;

namespace LiveMig.Bench;

/// <summary>What a reader needs to judge the numbers: cores, CPU, kernel, runtime, memory.</summary>
internal static class MachineInfo
{
    public static string CpuModel()
    {
        try
        {
            foreach (string line in File.ReadLines("/proc/cpuinfo"))
                if (line.StartsWith("model name", StringComparison.Ordinal))
                    return line[(line.IndexOf(':') + 1)..].Trim();
        }
        catch (IOException) { }
        return "unknown";
    }

    public static string Kernel()
    {
        try { return File.ReadAllText("/proc/sys/kernel/osrelease").Trim(); }
        catch (IOException) { return RuntimeInformation.OSDescription; }
    }

    public static string Distro()
    {
        try
        {
            foreach (string line in File.ReadLines("/etc/os-release"))
                if (line.StartsWith("PRETTY_NAME=", StringComparison.Ordinal))
                    return line["PRETTY_NAME=".Length..].Trim('"');
        }
        catch (IOException) { }
        return RuntimeInformation.OSDescription;
    }

    /// <summary>1, 5 and 15 minute load averages: on a shared machine they say how much the numbers were disturbed.</summary>
    public static string LoadAverage()
    {
        try { return string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)); }
        catch (IOException) { return "unknown"; }
    }

    public static string Markdown()
    {
        var w = new StringWriter();
        w.WriteLine("| Machine | |");
        w.WriteLine("|---|---|");
        w.WriteLine($"| nproc | {Environment.ProcessorCount} |");
        w.WriteLine($"| CPU | {CpuModel()} |");
        w.WriteLine($"| Memory | {Units.Bytes(Engine.MachineMemory.TotalBytes)} |");
        w.WriteLine($"| OS | {Distro()} |");
        w.WriteLine($"| Kernel | {Kernel()} |");
        w.WriteLine($"| .NET | {RuntimeInformation.FrameworkDescription} ({RuntimeInformation.ProcessArchitecture}, {(System.Runtime.GCSettings.IsServerGC ? "server" : "workstation")} GC) |");
        w.WriteLine($"| Date (UTC) | {DateTimeOffset.UtcNow:yyyy-MM-dd HH:mm} |");
        return w.ToString();
    }
}
