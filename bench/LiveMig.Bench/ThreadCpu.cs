using System.Globalization;

namespace LiveMig.Bench;

/// <summary>
/// The calling thread's CPU time and minor page faults so far, from /proc/thread-self/stat
/// (clock ticks of 10 ms: good enough for runs of seconds). A cheap per-thread profile that
/// needs no engine instrumentation: whether a side was busy or waiting, and how much of its
/// busy time was kernel (socket copies, page faults).
/// </summary>
internal readonly record struct ThreadCpu(double UserSeconds, double SystemSeconds, long MinorFaults)
{
    private const double Tick = 0.01; // CLK_TCK = 100 on Linux

    public static ThreadCpu Now()
    {
        try
        {
            string s = File.ReadAllText("/proc/thread-self/stat");
            string[] f = s[(s.LastIndexOf(')') + 2)..].Split(' ');
            // f[0] is field 3 (state): minflt is field 10, utime 14, stime 15.
            long minflt = long.Parse(f[7], CultureInfo.InvariantCulture);
            long utime = long.Parse(f[11], CultureInfo.InvariantCulture);
            long stime = long.Parse(f[12], CultureInfo.InvariantCulture);
            return new ThreadCpu(utime * Tick, stime * Tick, minflt);
        }
        catch (Exception e) when (e is IOException or FormatException or IndexOutOfRangeException)
        {
            return default;
        }
    }

    public static ThreadCpu operator -(ThreadCpu a, ThreadCpu b) => new(a.UserSeconds - b.UserSeconds, a.SystemSeconds - b.SystemSeconds, a.MinorFaults - b.MinorFaults);

    public double TotalSeconds => UserSeconds + SystemSeconds;
}
