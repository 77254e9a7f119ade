using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Workloads;

namespace LiveMig.Vm;

/// <summary>Everything needed to make a built-in VM.</summary>
public sealed record VmConfig
{
    public string Name { get; init; } = "vm0";
    public long MemoryBytes { get; init; } = 256L << 20;
    public int Vcpus { get; init; } = 2;
    public string Workload { get; init; } = "idle";
    public ulong Seed { get; init; } = 1;
    public MemoryFill Fill { get; init; } = MemoryFill.Zero;
    public DirtyLogKind DirtyLog { get; init; } = DirtyLogKind.Auto;
    /// <summary>
    /// Guest memory in this file (made here, sparse; e.g. under /dev/shm) instead of an anonymous
    /// memfd: it outlives the process, so after a post-copy switch a restarted source can still
    /// serve the pages the destination lacks (<c>livemig migrate --recover</c>). Null: a memfd.
    /// </summary>
    public string? MemoryFile { get; init; }
    /// <summary>The clock the vCPUs' throttle, dirty limit and workload pacing run by.</summary>
    public TimeProvider Time { get; init; } = TimeProvider.System;
}

/// <summary>
/// LiveMig's own VM: N vCPU threads, each running its workload program in short bursts against
/// guest memory. Pause parks every vCPU at a barrier between bursts; the vCPU "registers" are
/// the programs' state, serialised by <see cref="SaveState"/> and restored by <see cref="Restore"/>.
/// </summary>
public sealed class BuiltInVm : IVirtualMachine
{
    private const uint StateMagic = 0x53564D4C; // "LMVS"
    /// <summary>2: the workload's blob (e.g. a replayed trace) follows its spec. Format 1 (no blob) is still read.</summary>
    private const ushort StateFormat = 2;
    private const int MaxVcpus = 1024;

    private readonly object _gate = new();
    private readonly Thread[] _threads;
    private readonly VcpuProgram[] _programs;
    private bool _pauseRequested;
    private bool _stopping;
    private int _parked;
    private int _live;
    private double _throttle;
    private double _dirtyLimit;
    /// <summary>Bumped whenever the throttle or the dirty limit changes, so a dozing vCPU re-reads them.</summary>
    private int _controlVersion;
    // Timestamps (of _time) of the last Resume and of the first vCPU back at work after it (0: not yet).
    private long _resumedTs, _firstRunTs;

    /// <summary>Wall time a throttled vCPU runs between sleeps (QEMU's CPU_THROTTLE_TIMESLICE_NS).</summary>
    public static TimeSpan ThrottleTimeslice => VcpuPacer.Timeslice;

    private readonly Lazy<IDirtyLog> _dirtyLog;

    private readonly TimeProvider _time;

    private BuiltInVm(string name, GuestMemory memory, DirtyLogKind dirtyLogKind, Workload workload, ulong seed, VcpuProgram[] programs)
    {
        _time = workload.Time;
        Name = name;
        Memory = memory;
        // Made on first use: a VM that arrives by migration needs no tracking until it leaves
        // again, and registering its memory for write-protection is not free.
        _dirtyLog = new Lazy<IDirtyLog>(() =>
        {
            var log = DirtyLogFactory.Create(memory, dirtyLogKind, out string? note);
            DirtyLogNote = note;
            return log;
        });
        Workload = workload;
        Seed = seed;
        _programs = programs;
        _threads = new Thread[programs.Length];
    }

    /// <summary>The kind a built-in VM names in the Hello.</summary>
    public const string KindName = "builtin";

    public string Name { get; }
    public string Kind => KindName;
    public GuestMemory Memory { get; }
    public IDirtyLog DirtyLog => _dirtyLog.Value;
    public Workload Workload { get; }
    public ulong Seed { get; }
    public int VcpuCount => _programs.Length;
    public string Description => Workload.Spec.ToString();
    public VmBrakes Brakes => VmBrakes.Throttle | VmBrakes.DirtyLimit;
    public IReadOnlyList<VcpuProgram> Programs => _programs;
    public VmRunState State { get; private set; } = VmRunState.Created;
    public double ThrottleFraction => Volatile.Read(ref _throttle);
    public double DirtyRateLimit => Volatile.Read(ref _dirtyLimit);
    /// <summary>Why a vCPU stopped for good (a page it needed could not arrive), or null.</summary>
    public string? VcpuFailure { get; private set; }
    /// <summary>Said once when the dirty log had to fall back to software.</summary>
    public string? DirtyLogNote { get; private set; }

    /// <summary>From the last <see cref="Resume"/> until the first vCPU left the barrier to run; null before that happened.</summary>
    public TimeSpan? ResumeToFirstRun
    {
        get { lock (_gate) return _firstRunTs == 0 || _resumedTs == 0 ? null : _time.GetElapsedTime(_resumedTs, _firstRunTs); }
    }

    public long Operations
    {
        get { long n = 0; foreach (var p in _programs) n += Volatile.Read(ref p.Operations); return n; }
    }

    /// <summary>Makes a VM (memory filled, vCPUs not yet started: call <see cref="Start"/>).</summary>
    public static BuiltInVm Create(VmConfig config)
    {
        if (config.Vcpus < 1 || config.Vcpus > MaxVcpus) throw new ArgumentOutOfRangeException(nameof(config), $"vcpus must be 1..{MaxVcpus}");
        var spec = WorkloadSpec.Parse(config.Workload);
        var memory = config.MemoryFile is { } file ? CreateFileMemory(file, config.MemoryBytes) : GuestMemory.Create(config.MemoryBytes, "livemig-" + config.Name);
        try
        {
            var workload = Workloads.Workload.Create(spec, memory.PageCount, time: config.Time);
            MemoryFiller.Fill(memory, config.Fill, config.Seed);
            var programs = new VcpuProgram[config.Vcpus];
            ulong s = config.Seed;
            for (int i = 0; i < programs.Length; i++) programs[i] = workload.CreateProgram(memory, i, programs.Length, Xoshiro256.SplitMix(ref s));
            var vm = new BuiltInVm(config.Name, memory, config.DirtyLog, workload, config.Seed, programs) { _memoryFile = config.MemoryFile };
            _ = vm.DirtyLog; // the source side tracks soon: make it now, so a fallback note is known up front
            return vm;
        }
        catch
        {
            memory.Dispose();
            if (config.MemoryFile is { } made) File.Delete(made);
            throw;
        }
    }

    /// <summary>
    /// The memory file this VM made (<see cref="VmConfig.MemoryFile"/>), removed when the VM ends
    /// here (disposed: the migration completed, or failed and the process ends). Only a process
    /// that dies without disposing leaves it, which is what it is for.
    /// </summary>
    private string? _memoryFile;

    /// <summary>A new sparse file of <paramref name="size"/> bytes, mapped shared; refused if the file exists (it may hold a paused VM).</summary>
    private static GuestMemory CreateFileMemory(string path, long size)
    {
        try
        {
            using (var f = new FileStream(path, FileMode.CreateNew, FileAccess.ReadWrite)) f.SetLength(size);
        }
        catch (IOException e) when (File.Exists(path))
        {
            throw new IOException($"memory file {path} exists already (it may hold a paused VM: recover it, or remove it first)", e);
        }
        return GuestMemory.Open(path, size);
    }

    /// <summary>
    /// Rebuilds a VM from its saved state over memory that already holds its pages (the
    /// destination side of a migration). Takes ownership of <paramref name="memory"/>. The VM is
    /// paused: vCPU threads exist but wait for <see cref="Resume"/>. Hostile state bytes get an
    /// <see cref="InvalidDataException"/>.
    /// </summary>
    public static BuiltInVm Restore(GuestMemory memory, ReadOnlySpan<byte> state, DirtyLogKind dirtyLogKind = DirtyLogKind.Auto) => Restore(memory, state, dirtyLogKind, null);

    /// <summary>As <see cref="Restore(GuestMemory, ReadOnlySpan{byte}, DirtyLogKind)"/>, running the vCPUs on <paramref name="threads"/> when they fit (else on new threads).</summary>
    public static BuiltInVm Restore(GuestMemory memory, ReadOnlySpan<byte> state, DirtyLogKind dirtyLogKind, ParkedThreads? threads, TimeProvider? time = null)
    {
        try
        {
            using var ms = new MemoryStream(state.ToArray(), writable: false);
            using var r = new BinaryReader(ms);
            if (r.ReadUInt32() != StateMagic) throw new InvalidDataException("VM state: bad magic");
            ushort format = r.ReadUInt16();
            if (format is not (1 or StateFormat)) throw new InvalidDataException($"VM state: format {format} not supported (this build reads 1 and {StateFormat})");
            string name = r.ReadString();
            string workloadText = r.ReadString();
            byte[]? blob = format >= 2 ? ReadBlob(r, ms) : null;
            ulong seed = r.ReadUInt64();
            int vcpus = r.ReadInt32();
            if (vcpus < 1 || vcpus > MaxVcpus) throw new InvalidDataException($"VM state: {vcpus} vCPUs is out of range");
            var workload = Workloads.Workload.Create(WorkloadSpec.Parse(workloadText), memory.PageCount, blob, time);
            var programs = new VcpuProgram[vcpus];
            ulong s = seed;
            for (int i = 0; i < vcpus; i++)
            {
                programs[i] = workload.CreateProgram(memory, i, vcpus, Xoshiro256.SplitMix(ref s));
                programs[i].Load(r);
            }
            double throttle = r.ReadDouble();
            if (ms.Position != ms.Length) throw new InvalidDataException($"VM state: {ms.Length - ms.Position} unexpected trailing bytes");
            var vm = new BuiltInVm(name, memory, dirtyLogKind, workload, seed, programs);
            vm._throttle = 0; // a throttle (or a dirty limit, which is not saved) never outlives the migration that set it
            _ = throttle;
            vm.StartPaused(threads);
            return vm;
        }
        catch (EndOfStreamException) { throw new InvalidDataException("VM state: truncated"); }
        catch (FormatException e) { throw new InvalidDataException("VM state: " + e.Message); }
    }

    /// <summary>Length (-1: none) and bytes.</summary>
    private static byte[]? ReadBlob(BinaryReader r, MemoryStream ms)
    {
        int length = r.ReadInt32();
        if (length == -1) return null;
        if (length < 0 || length > ms.Length - ms.Position) throw new InvalidDataException($"VM state: workload blob of {length} bytes does not fit in the state");
        return r.ReadBytes(length);
    }

    public byte[] SaveState()
    {
        if (State == VmRunState.Running) throw new InvalidOperationException("save VM state only while paused");
        using var ms = new MemoryStream();
        using var w = new BinaryWriter(ms);
        WriteState(w);
        return ms.ToArray();
    }

    /// <summary>
    /// Runs the state-saving code once into nowhere (JIT, type loads), so that the first real save,
    /// inside a switch-over, does not pay for it. Only reads the vCPU state: safe while running.
    /// </summary>
    public void WarmSwitchover()
    {
        using var w = new BinaryWriter(Stream.Null);
        WriteState(w);
    }

    private void WriteState(BinaryWriter w)
    {
        w.Write(StateMagic);
        w.Write(StateFormat);
        w.Write(Name);
        w.Write(Workload.Spec.ToString());
        byte[]? blob = Workload.StateBlob;
        w.Write(blob?.Length ?? -1);
        if (blob is not null) w.Write(blob);
        w.Write(Seed);
        w.Write(_programs.Length);
        foreach (var p in _programs) p.Save(w);
        w.Write(ThrottleFraction);
        w.Flush();
    }

    public void Start()
    {
        lock (_gate)
        {
            if (State != VmRunState.Created) throw new InvalidOperationException($"VM {Name} is {State}");
            StartThreads();
            State = VmRunState.Running;
        }
    }

    private void StartPaused(ParkedThreads? threads)
    {
        lock (_gate)
        {
            // The threads start with the pause already requested, so none runs a step before Resume;
            // not waiting for them to reach the barrier keeps their scheduling out of the switch-over.
            _pauseRequested = true;
            if (threads?.Take(_threads.Length, i => () => RunVcpu(i)) is { } ready)
            {
                ready.CopyTo(_threads, 0);
                _live += ready.Length;
            }
            else StartThreads();
            State = VmRunState.Paused;
        }
    }

    private void StartThreads()
    {
        for (int i = 0; i < _threads.Length; i++)
        {
            int index = i;
            _threads[i] = new Thread(() => RunVcpu(index)) { IsBackground = true, Name = $"{Name}/vcpu{i}" };
            _live++;
            _threads[i].Start();
        }
    }

    public void Pause()
    {
        lock (_gate)
        {
            if (State != VmRunState.Running) return;
            _pauseRequested = true;
            Monitor.PulseAll(_gate);
            while (_parked < _live) Monitor.Wait(_gate);
            State = VmRunState.Paused;
        }
    }

    public void Resume()
    {
        lock (_gate)
        {
            if (State != VmRunState.Paused) return;
            foreach (var p in _programs) p.OnResume();
            _pauseRequested = false;
            State = VmRunState.Running;
            _resumedTs = _time.GetTimestamp();
            _firstRunTs = 0;
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>The workload's free-page hint (pages outside the range it uses).</summary>
    public long ReportFreePages(PageBitmap into) => Workload.FreePages(into);

    /// <summary>
    /// QEMU-style CPU throttle: a throttled vCPU runs for <see cref="ThrottleTimeslice"/> of wall
    /// time, then sleeps fraction/(1-fraction) timeslices (at 0.99: 990 ms). A pause, a stop or a
    /// change of throttle wakes it at once, so throttling never lengthens a pause.
    /// </summary>
    public void Throttle(double fraction) => SetControl(ref _throttle, Math.Clamp(double.IsNaN(fraction) ? 0 : fraction, 0, 0.99));

    /// <summary>
    /// QEMU's dirty-limit: every vCPU may write at most this many pages per second (each of its
    /// program's operations counts as one page write); over budget it sleeps until back within
    /// it. 0 lifts the limit.
    /// </summary>
    public void LimitDirtyRate(double pagesPerSecondPerVcpu) =>
        SetControl(ref _dirtyLimit, double.IsNaN(pagesPerSecondPerVcpu) || pagesPerSecondPerVcpu <= 0 ? 0 : pagesPerSecondPerVcpu);

    private void SetControl(ref double field, double value)
    {
        // Unchanged (e.g. releasing brakes never applied, at the pause): no need to wake every vCPU.
        if (Volatile.Read(ref field) == value) return;
        Volatile.Write(ref field, value);
        lock (_gate)
        {
            _controlVersion++;
            Monitor.PulseAll(_gate);
        }
    }

    private void RunVcpu(int index)
    {
        VcpuProgram program = _programs[index];
        var pacer = new VcpuPacer(_time.TimestampFrequency);
        pacer.Restart(_time.GetTimestamp());
        try
        {
            while (true)
            {
                if (Volatile.Read(ref _pauseRequested) || Volatile.Read(ref _stopping))
                {
                    if (!Park()) return;
                    pacer.Restart(_time.GetTimestamp());
                    continue;
                }
                int done = program.Step(Memory);
                if (done == 0)
                {
                    // Idle: nap on the gate, so that Pause wakes us at once instead of after a sleep.
                    lock (_gate) { if (!_pauseRequested && !_stopping) Monitor.Wait(_gate, 1); }
                }
                long now = _time.GetTimestamp();
                double debtMs = pacer.DirtyLimitDoze(done, now, Volatile.Read(ref _dirtyLimit));
                if (debtMs > 0) Doze(debtMs);
                double throttleMs = pacer.ThrottleDoze(now, Volatile.Read(ref _throttle));
                if (throttleMs > 0)
                {
                    Doze(throttleMs);
                    pacer.SliceStarted(_time.GetTimestamp());
                }
            }
        }
        catch (PageUnavailableException e)
        {
            // Post-copy was abandoned while this vCPU waited for a page: it stops here (never runs on a wrong page).
            VcpuFailure ??= e.Message;
        }
        finally
        {
            lock (_gate) { _live--; Monitor.PulseAll(_gate); }
        }
    }

    /// <summary>Sleeps up to <paramref name="ms"/>, waking early on pause, stop, or a throttle/limit change.</summary>
    private void Doze(double ms)
    {
        long until = _time.GetTimestamp() + (long)(ms / 1000 * _time.TimestampFrequency);
        lock (_gate)
        {
            int version = _controlVersion;
            while (!_pauseRequested && !_stopping && _controlVersion == version)
            {
                long left = until - _time.GetTimestamp();
                if (left <= 0) return;
                Monitor.Wait(_gate, (int)Math.Min(int.MaxValue, Math.Ceiling(left * 1000.0 / _time.TimestampFrequency)));
            }
        }
    }

    /// <summary>Waits at the barrier; false when the VM is stopping.</summary>
    private bool Park()
    {
        lock (_gate)
        {
            _parked++;
            Monitor.PulseAll(_gate);
            while (_pauseRequested && !_stopping) Monitor.Wait(_gate);
            _parked--;
            if (_firstRunTs == 0 && _resumedTs != 0 && !_stopping) _firstRunTs = _time.GetTimestamp();
            return !_stopping;
        }
    }

    /// <summary>Ends the vCPU threads for good (the VM cannot run again); memory stays readable until Dispose.</summary>
    public void Stop()
    {
        lock (_gate)
        {
            if (State == VmRunState.Stopped) return;
            _stopping = true;
            Monitor.PulseAll(_gate);
            State = VmRunState.Stopped;
        }
        foreach (var t in _threads) t?.Join();
    }

    /// <summary>Checks the workload's memory invariant; call while paused or stopped.</summary>
    public string? CheckInvariant() => Workload.CheckInvariant(Memory, _programs);

    /// <summary>
    /// Ends the vCPU threads of a VM that never ran (a destination's early restore that the
    /// migration went back on) and hands its memory back undisposed; the VM is unusable after.
    /// </summary>
    internal GuestMemory DetachMemory()
    {
        Stop();
        (Workload as IDisposable)?.Dispose();
        if (_dirtyLog.IsValueCreated) _dirtyLog.Value.Dispose();
        return Memory;
    }

    public void Dispose()
    {
        Stop();
        (Workload as IDisposable)?.Dispose();
        if (_dirtyLog.IsValueCreated) _dirtyLog.Value.Dispose();
        Memory.Dispose();
        if (_memoryFile is { } file) File.Delete(file);
    }
}
