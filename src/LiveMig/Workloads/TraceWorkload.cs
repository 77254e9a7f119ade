using System.IO.Hashing;
using LiveMig.Memory;
using LiveMig.Traces;

namespace LiveMig.Workloads;

/// <summary>
/// Replays a recorded trace (<c>trace:FILE[,speed=X]</c>): the vCPUs first write the trace's
/// initial image, then each interval's pages at their recorded times (spread evenly over the
/// interval), with content made from the content model — zero stays zero, a compressibility
/// class gets bytes LZ4 shrinks about as much, a duplicate copies its page, a small change
/// changes that many bytes. At the end it starts over. Page i of the trace is guest page i;
/// vCPU v writes the pages i with i mod N = v. The trace's bytes travel in the VM state
/// (<see cref="Workload.StateBlob"/>), so the destination continues the replay without the file.
/// Time is the replay's own: it advances while the vCPU runs, so throttling stretches it as it
/// would the application's.
/// </summary>
public sealed class TraceWorkload : Workload
{
    /// <summary>The trace travels in the VM state, which a destination accepts up to 256 MiB by default (chunked: DestinationOptions.MaxVmStateBytes); a trace stays well within it.</summary>
    public const int MaxTraceBytes = 128 << 20;

    private readonly byte[] _bytes;
    internal readonly TraceFile Trace;
    internal readonly double Speed;
    /// <summary>Per write (interval, position): write the whole page rather than change BytesChanged bytes in it.</summary>
    internal readonly bool[][] Whole;

    public TraceWorkload(WorkloadSpec spec, long memoryPages, byte[]? state) : base(spec)
    {
        spec.CheckKnown("file", "speed");
        Speed = spec.Double("speed", 1, 0.01, 1000);
        _bytes = state ?? ReadFile(spec);
        if (_bytes.Length > MaxTraceBytes)
            throw new FormatException($"trace of {Units.Bytes(_bytes.Length)} is too large to travel in the VM state (at most {Units.Bytes(MaxTraceBytes)}); record a shorter one");
        try { Trace = TraceFile.Read(_bytes); }
        catch (InvalidDataException e) { throw new FormatException(e.Message); }
        int space = Math.Max(Trace.End.PageSpace, Trace.Intervals.Count == 0 ? 0 : Trace.Intervals.Max(i => i.PageSpace));
        if (space > memoryPages)
            throw new FormatException($"the trace uses {space:N0} pages ({Units.Bytes(space * 4096.0)}); the VM has {memoryPages:N0}: give --memory at least that");
        if (Trace.Intervals.Count < 2 || Trace.End.Duration <= TimeSpan.Zero)
            throw new FormatException("the trace has no interval after its initial image: nothing to replay");
        PageSpace = space;
        Whole = WholePageWrites(Trace);
    }

    public int PageSpace { get; }
    public override byte[]? StateBlob => _bytes;

    private static byte[] ReadFile(WorkloadSpec spec)
    {
        if (!spec.Parameters.TryGetValue("file", out string? path)) throw new FormatException("workload 'trace' needs a file: trace:FILE[,speed=X]");
        try
        {
            long size = new FileInfo(path).Length;
            if (size > MaxTraceBytes) throw new FormatException($"trace {path} is {Units.Bytes(size)}: at most {Units.Bytes(MaxTraceBytes)} travels in the VM state; record a shorter one");
            return File.ReadAllBytes(path);
        }
        catch (IOException e) { throw new FormatException($"cannot read trace {path}: {e.Message}"); }
        catch (UnauthorizedAccessException e) { throw new FormatException($"cannot read trace {path}: {e.Message}"); }
    }

    /// <summary>A write changes BytesChanged bytes only where the page keeps its class (else the page gets new content throughout).</summary>
    private static bool[][] WholePageWrites(TraceFile t)
    {
        var last = new PageContent[t.Intervals.Max(i => i.PageSpace)];
        Array.Fill(last, PageContent.Duplicate); // unknown before its first write
        var whole = new bool[t.Intervals.Count][];
        foreach (var iv in t.Intervals)
        {
            var w = whole[iv.Index] = new bool[iv.Count];
            for (int i = 0; i < iv.Count; i++)
            {
                var c = iv.Content[i];
                w[i] = iv.IsInitialImage || c != last[iv.Pages[i]] || c is PageContent.Zero or PageContent.Duplicate
                       || iv.BytesChanged[i] > TraceContent.RandomBytes(c) / 2;
                last[iv.Pages[i]] = c;
            }
        }
        return whole;
    }

    /// <summary>Pages beyond the trace's page space are never written: reported free.</summary>
    public override long FreePages(PageBitmap into) => FreeAbove(into, PageSpace);

    public override VcpuProgram CreateProgram(GuestMemory memory, int vcpu, int vcpuCount, ulong seed) => new TraceReplayProgram(this, vcpu, vcpuCount, seed);

    /// <summary>The pages each vCPU wrote last still hold what it wrote (checked by hash).</summary>
    public override string? CheckInvariant(GuestMemory memory, IReadOnlyList<VcpuProgram> programs)
    {
        foreach (TraceReplayProgram p in programs.Cast<TraceReplayProgram>())
            if (p.CheckRecent(memory) is { } broken) return broken;
        return null;
    }
}

/// <summary>Content for the model's classes: random bytes for a share of the page, a repeated pattern for the rest.</summary>
internal static class TraceContent
{
    private static readonly byte[] Pattern = "LiveMig trace replay: this part of the page compresses well. "u8.ToArray();

    public static int RandomBytes(PageContent c) => (int)(PageClasses.PageSize * PageClasses.RandomShare(c));

    public static void Fill(Span<byte> page, PageContent c, ref Xoshiro256 rng)
    {
        int r = RandomBytes(c) & ~7;
        for (int i = 0; i < r; i += 8) BitConverter.TryWriteBytes(page[i..], rng.Next());
        for (int i = r; i < page.Length; i++) page[i] = Pattern[i % Pattern.Length];
    }

    /// <summary>Changes <paramref name="count"/> bytes of the random part (so the page keeps its class).</summary>
    public static void Change(Span<byte> page, PageContent c, int count, ref Xoshiro256 rng)
    {
        int r = Math.Max(RandomBytes(c), count);
        int at = (int)rng.NextBelow(r - count + 1);
        for (int i = 0; i < count; i++)
        {
            byte b = (byte)rng.Next();
            page[at + i] = b == page[at + i] ? (byte)~b : b; // every one of them changes
        }
    }
}

/// <summary>One vCPU's share of the replay; its registers are its place in the trace and its replay clock.</summary>
internal sealed class TraceReplayProgram(TraceWorkload w, int vcpu, int vcpuCount, ulong seed) : VcpuProgram
{
    private const int Burst = 256;
    private const int RecentWrites = 64;
    /// <summary>Most replay time one step may add after a step that worked: a vCPU kept from running (throttle, dirty limit, a busy host) falls behind, as the application would.</summary>
    private readonly long BusyCatchUp = w.Time.TimestampFrequency / 1000;
    /// <summary>After an idle step the clock may catch up this much: idle naps are about 1 ms, a throttle's sleep is longer, and stretches the replay.</summary>
    private readonly long IdleCatchUp = w.Time.TimestampFrequency / 200;

    private Xoshiro256 _rng = new(seed);
    private int _interval, _pos, _loops;
    private double _clockUs; // replay time within the current pass over the trace
    private long _last = w.Time.GetTimestamp();
    private bool _lastIdle = true;
    private readonly long[] _recentPage = new long[RecentWrites];
    private readonly ulong[] _recentHash = new ulong[RecentWrites];
    private int _recentCount, _recentNext;

    public override int Step(GuestMemory memory)
    {
        long now = w.Time.GetTimestamp();
        long delta = Math.Min(now - _last, _lastIdle ? IdleCatchUp : BusyCatchUp);
        _last = now;
        if (_interval > 0) _clockUs += delta * 1e6 / w.Time.TimestampFrequency * w.Speed;
        int done = 0;
        while (done < Burst)
        {
            var iv = w.Trace.Intervals[_interval];
            int due = _interval == 0 ? iv.Count : Due(iv);
            if (_pos >= due && _pos < iv.Count) break; // nothing more due yet
            if (_pos >= iv.Count)
            {
                if (!NextInterval()) break;
                continue;
            }
            int page = iv.Pages[_pos];
            if (page % vcpuCount == vcpu)
            {
                Write(memory, iv, _pos);
                done++;
            }
            _pos++;
        }
        Operations += done;
        _lastIdle = done == 0;
        return done;
    }

    /// <summary>Writes of the interval due by now: spread evenly over it.</summary>
    private int Due(TraceInterval iv)
    {
        double into = _clockUs - iv.Start.Ticks / 10.0, length = iv.Duration.Ticks / 10.0;
        if (into <= 0) return 0;
        return length <= 0 || into >= length ? iv.Count : (int)Math.Ceiling(iv.Count * into / length);
    }

    /// <summary>Moves to the next interval; false while the last one's time has not run out (the trace starts over only then).</summary>
    private bool NextInterval()
    {
        double total = w.Trace.End.Duration.Ticks / 10.0;
        if (_interval + 1 < w.Trace.Intervals.Count) { _interval++; _pos = 0; return true; }
        if (_clockUs < total) return false;
        // Start over (without the initial image: memory already holds a state of the application).
        _interval = 1;
        _pos = 0;
        _loops++;
        _clockUs -= total;
        return true;
    }

    private void Write(GuestMemory memory, TraceInterval iv, int i)
    {
        int page = iv.Pages[i];
        var content = iv.Content[i];
        Span<byte> target = memory.GuestPage(page);
        if (content == PageContent.Zero) target.Clear();
        else if (content == PageContent.Duplicate) memory.GuestPage(iv.DuplicateOf[i]).CopyTo(target);
        else if (w.Whole[iv.Index][i]) TraceContent.Fill(target, content, ref _rng);
        else TraceContent.Change(target, content, iv.BytesChanged[i], ref _rng);
        memory.NoteWrite(page);
        _recentPage[_recentNext] = page;
        _recentHash[_recentNext] = XxHash3.HashToUInt64(target);
        _recentNext = (_recentNext + 1) % RecentWrites;
        _recentCount = Math.Min(_recentCount + 1, RecentWrites);
    }

    /// <summary>Checks the last content written to each of the recently written pages.</summary>
    public string? CheckRecent(GuestMemory memory)
    {
        var latest = new HashSet<long>();
        for (int k = 1; k <= _recentCount; k++)
        {
            int slot = (_recentNext - k + RecentWrites) % RecentWrites;
            long page = _recentPage[slot];
            if (!latest.Add(page)) continue; // written again later: only its last write counts
            if (XxHash3.HashToUInt64(memory.GuestPage(page)) != _recentHash[slot])
                return $"trace replay invariant broken at page {page}: it does not hold what vCPU {vcpu} wrote there last (interval {_interval}, pass {_loops})";
        }
        return null;
    }

    public override void Save(BinaryWriter bw)
    {
        _rng.Write(bw);
        bw.Write(_interval); bw.Write(_pos); bw.Write(_loops); bw.Write(_clockUs); bw.Write(Operations);
        bw.Write(_recentCount); bw.Write(_recentNext);
        for (int k = 0; k < RecentWrites; k++) { bw.Write(_recentPage[k]); bw.Write(_recentHash[k]); }
    }

    public override void Load(BinaryReader r)
    {
        _rng = Xoshiro256.Read(r);
        _interval = r.ReadInt32(); _pos = r.ReadInt32(); _loops = r.ReadInt32(); _clockUs = r.ReadDouble(); Operations = r.ReadInt64();
        _recentCount = r.ReadInt32(); _recentNext = r.ReadInt32();
        for (int k = 0; k < RecentWrites; k++) { _recentPage[k] = r.ReadInt64(); _recentHash[k] = r.ReadUInt64(); }
        if (_interval < 0 || _interval >= w.Trace.Intervals.Count || _pos < 0 || _pos > w.Trace.Intervals[_interval].Count
            || _recentCount is < 0 or > RecentWrites || _recentNext is < 0 or >= RecentWrites || !double.IsFinite(_clockUs)
            || _recentPage.Any(p => p < 0 || p >= w.PageSpace))
            throw new InvalidDataException($"trace replay state out of range (interval {_interval}, position {_pos})");
    }

    public override void OnResume()
    {
        _last = w.Time.GetTimestamp();
        _lastIdle = false;
    }
}
