using System.Diagnostics;
using Microsoft.Win32.SafeHandles;

namespace LiveMig.Traces;

public sealed record RecorderOptions
{
    public TimeSpan Interval { get; init; } = TimeSpan.FromMilliseconds(100);
    /// <summary>Stop after this long; null = until the target exits or the token is cancelled.</summary>
    public TimeSpan? Duration { get; init; }
    /// <summary>Also read the target's descendant processes (multi-process programs: PostgreSQL, make).</summary>
    public bool Children { get; init; }
    /// <summary>
    /// Read only the writable mappings of this file (e.g. a QEMU guest's RAM file on /dev/shm):
    /// the guest's whole RAM, its kernel's page cache included, and none of QEMU's own memory.
    /// Null: every writable mapping.
    /// </summary>
    public string? Mapping { get; init; }
}

public sealed record RecordingResult
{
    public int Intervals { get; init; }
    public int PageSpace { get; init; }
    public long PagesWritten { get; init; }
    public TimeSpan Duration { get; init; }
    public TraceEndReason Reason { get; init; }
    /// <summary>Time each scan of the target took (its cost: it runs while the target runs).</summary>
    public List<double> ScanMs { get; init; } = [];
    public long ShadowBytes { get; init; }
}

/// <summary>
/// Records which pages of a live process change, interval by interval, from outside it: every
/// interval it reads the present pages of the target's writable mappings (process_vm_readv) and
/// compares each page's xxHash3 with the last one. A page written back with the same bytes, or
/// written and restored within one interval, is not seen — a migration would not resend it
/// either. A scan is not atomic: it takes time while the target runs (see docs/trace-format.md for
/// the measured accuracy and cost).
/// </summary>
public sealed class TraceRecorder(int pid, RecorderOptions options)
{
    private const int WindowPages = 256;
    private readonly PageSpace _space = new();
    private readonly byte[] _buffer = new byte[WindowPages * PageClasses.PageSize];
    private readonly byte[] _pagemapScratch = new byte[WindowPages * 8];
    private readonly bool[] _resident = new bool[WindowPages];

    /// <summary>The Stopwatch timestamp of the trace's time 0 (for aligning it with the target's own clock).</summary>
    public long StartTimestamp { get; private set; }

    /// <summary>Scans finished so far, the initial image's included.</summary>
    public int ScansDone => Volatile.Read(ref _scansDone);
    private int _scansDone;

    /// <summary>The trace's page index of the target's private page at <paramref name="address"/>, or -1 (for accuracy checks).</summary>
    internal int IndexOf(int process, ulong address) => _space.IndexOf(new PageSpace.Key(false, (ulong)process, 0, address / PageClasses.PageSize));

    /// <summary>
    /// Records into <paramref name="writer"/> until the duration ends, <paramref name="stop"/> is
    /// cancelled or the target exits, and seals the trace. Only whole intervals are written.
    /// </summary>
    public RecordingResult Run(TraceWriter writer, CancellationToken stop, Func<string>? exitNote = null)
    {
        var scans = new List<double>();
        long t0 = Stopwatch.GetTimestamp();
        long pagesWritten = 0;
        StartTimestamp = t0;
        TimeSpan prev = TimeSpan.Zero;
        var reason = TraceEndReason.Completed;
        try
        {
            var initial = Scan(0, TimeSpan.Zero, TimeSpan.Zero, initial: true, scans);
            writer.Write(initial);
            // Time 0 is the end of the initial image's scan: the intervals measure from there.
            StartTimestamp = t0 = Stopwatch.GetTimestamp();
            for (int k = 1; ; k++)
            {
                TimeSpan next = prev + options.Interval;
                if (options.Duration is { } d && next > d) next = d;
                if (next <= prev || !SleepUntil(t0, next, stop)) break;
                TimeSpan at = Stopwatch.GetElapsedTime(t0);
                var iv = Scan(k, prev, at - prev, initial: false, scans);
                writer.Write(iv);
                pagesWritten += iv.Count;
                prev = at;
                if (options.Duration is { } end && at >= end) break;
            }
        }
        catch (TargetExitedException e) when (e.Pid == pid)
        {
            reason = TraceEndReason.TargetExited; // the interval it was in is dropped: only whole ones count
        }
        string note = reason == TraceEndReason.TargetExited ? $"process {pid} exited{exitNote?.Invoke()}" : "";
        if (writer.Intervals == 0) throw new InvalidOperationException($"process {pid} exited before its memory could be read once");
        writer.Seal(reason, note);
        return new RecordingResult
        {
            Intervals = writer.Intervals, PageSpace = _space.Count, PagesWritten = pagesWritten, Duration = prev, Reason = reason, ScanMs = scans, ShadowBytes = _space.ShadowBytes,
        };
    }

    /// <summary>Waits until <paramref name="at"/> after <paramref name="t0"/>; false when stopped first.</summary>
    private static bool SleepUntil(long t0, TimeSpan at, CancellationToken stop)
    {
        var left = at - Stopwatch.GetElapsedTime(t0);
        if (left > TimeSpan.Zero) stop.WaitHandle.WaitOne(left);
        return !stop.IsCancellationRequested;
    }

    private TraceInterval Scan(int index, TimeSpan start, TimeSpan duration, bool initial, List<double> scans)
    {
        long began = Stopwatch.GetTimestamp();
        var changes = new List<(int Page, PageContent Content, int Dup, ushort Changed)>();
        _space.NextScan();
        ScanProcess(pid, initial, changes);
        var alive = new HashSet<int> { pid };
        if (options.Children)
            foreach (int child in ProcessMemory.Descendants(pid))
            {
                try { ScanProcess(child, initial, changes); alive.Add(child); }
                catch (TargetExitedException) { } // a child that ends is the program's business
                catch (UnauthorizedAccessException) { } // e.g. a setuid helper: not ours to read
            }
        // Pages of exited children are reused by the next new ones, as a guest kernel reuses freed frames.
        _space.ForgetProcessesExcept(alive);
        // Stable order, and one entry a page: a shared page seen changing in two processes keeps its last content.
        changes = changes.Select((c, i) => (c, i)).OrderBy(x => x.c.Page).ThenBy(x => x.i).Select(x => x.c).ToList();
        changes = changes.Where((c, i) => i + 1 == changes.Count || changes[i + 1].Page != c.Page).ToList();
        scans.Add(Stopwatch.GetElapsedTime(began).TotalMilliseconds);
        Interlocked.Increment(ref _scansDone);
        return new TraceInterval
        {
            Index = index, Start = start, Duration = duration, PageSpace = _space.Count,
            Pages = changes.Select(c => c.Page).ToArray(), Content = changes.Select(c => c.Content).ToArray(),
            DuplicateOf = changes.Select(c => c.Dup).ToArray(), BytesChanged = changes.Select(c => c.Changed).ToArray(),
        };
    }

    private void ScanProcess(int target, bool initial, List<(int, PageContent, int, ushort)> changes)
    {
        var maps = ProcessMemory.WritableMappings(target);
        // A zombie (exited, not yet reaped) still has a /proc entry but no mappings.
        if (maps.Count == 0) throw new TargetExitedException(target);
        if (options.Mapping is { } only)
        {
            // The kernel shows a removed file as "PATH (deleted)": still the same memory.
            maps = maps.FindAll(m => m.Name == only || m.Name == only + " (deleted)");
            if (maps.Count == 0 && target == pid)
                throw new InvalidOperationException($"process {pid} has no writable mapping of {only} (see /proc/{pid}/maps)");
        }
        SafeFileHandle pagemap;
        try { pagemap = File.OpenHandle($"/proc/{target}/pagemap"); }
        catch (UnauthorizedAccessException) { throw ProcessMemory.NoPermission(target); }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException) { throw new TargetExitedException(target); }
        catch (IOException e) when (e.HResult == ProcessMemory.ESRCH) { throw new TargetExitedException(target); } // exiting: its /proc entry is still there, its memory no longer
        using (pagemap)
            foreach (var m in maps) ScanMapping(target, pagemap, m, initial, changes);
    }

    private static PageSpace.Key KeyOf(int target, Mapping m, long pageInMapping) => m.Shared
        ? new PageSpace.Key(true, m.Device, m.Inode, m.Offset / PageClasses.PageSize + (ulong)pageInMapping)
        : new PageSpace.Key(false, (ulong)target, 0, m.Start / PageClasses.PageSize + (ulong)pageInMapping);

    private void ScanMapping(int target, SafeFileHandle pagemap, Mapping m, bool initial, List<(int, PageContent, int, ushort)> changes)
    {
        for (long w = 0; w < m.Pages; w += WindowPages)
        {
            int n = (int)Math.Min(WindowPages, m.Pages - w);
            ulong windowStart = m.Start + (ulong)w * PageClasses.PageSize;
            try { ProcessMemory.ResidentPages(pagemap, windowStart, n, _resident, _pagemapScratch); }
            catch (IOException) { return; } // the mapping went away
            if (m.Shared)
                for (int i = 0; i < n; i++)
                    _resident[i] &= !_space.SeenInScan(KeyOf(target, m, w + i));
            for (int i = 0; i < n;)
            {
                if (!_resident[i]) { i++; continue; }
                int j = i;
                while (j < n && _resident[j]) j++;
                var span = _buffer.AsSpan(0, (j - i) * PageClasses.PageSize);
                long got = ProcessMemory.Read(target, windowStart + (ulong)i * PageClasses.PageSize, span) / PageClasses.PageSize;
                for (int p = 0; p < got; p++)
                {
                    var key = KeyOf(target, m, w + i + p);
                    if (_space.Observe(key, span.Slice(p * PageClasses.PageSize, PageClasses.PageSize), initial, out int index, out var content, out int dup, out int changed))
                        changes.Add((index, content, dup, (ushort)changed));
                }
                i = j;
            }
        }
    }
}
