using System.Diagnostics;
using LiveMig.Qemu;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Mtd;

/// <summary>What a move looked like from the VM's service: requests answered (or guest passes made), errors, the longest wait.</summary>
public readonly record struct ServiceView(long Requests, long Errors, double MaxLatencyMs, double LongestGapMs);

/// <summary>What the boot-sector guest reported through the moves: its passes over its range, the stale or lost pages it found, and moves after which it made no progress.</summary>
public sealed record GuestChecks
{
    public long Passes { get; init; }
    public long Errors { get; init; }
    /// <summary>Moves after which the guest did not report a new pass within the bound (it stopped, or its serial line did).</summary>
    public int Stalls { get; init; }
}

/// <summary>
/// What keeps using the VM while <see cref="LiveMtd"/> moves it, and what it saw: a kv client
/// for the built-in VM, the guest's own consistency check for the boot-sector QEMU guest.
/// </summary>
internal interface IMtdWitness : IDisposable
{
    /// <summary>The VM is about to resume on an agent (that agent's BeforeResume).</summary>
    void Arrived(IVirtualMachine vm);

    /// <summary>Starts watching the VM where it first runs.</summary>
    void Start(IVirtualMachine vm);

    /// <summary>What it saw of the move between the two <see cref="Stopwatch"/> timestamps; <paramref name="at"/> finds the VM where it runs now (null until that agent has listed it).</summary>
    ServiceView Moved(long t0, long t1, Func<IVirtualMachine?> at);

    void Stop();
}

/// <summary>The built-in VM's kv store used by a <see cref="KvClient"/> through one address that follows the VM.</summary>
internal sealed class KvWitness : IMtdWitness
{
    private readonly KvEndpoint _endpoint = new();
    private readonly ulong _seed;
    private KvClient? _client;

    public KvWitness(ulong seed) => _seed = seed;

    public KvClientStats? Stats { get; private set; }

    // The VM's address follows it: requests go to the store where it resumes (as a gratuitous ARP would).
    public void Arrived(IVirtualMachine vm) => _endpoint.Attach((vm as BuiltInVm)?.Workload as KvWorkload);

    public void Start(IVirtualMachine vm)
    {
        var kv = (KvWorkload)((BuiltInVm)vm).Workload;
        _endpoint.Attach(kv);
        _client = new KvClient(_endpoint.EndPoint, new KvClientOptions { Seed = _seed, MaxValueLength = Math.Min(256, kv.ValueSize), MaxDuration = TimeSpan.FromDays(30) });
        _client.Start();
    }

    public ServiceView Moved(long t0, long t1, Func<IVirtualMachine?> at)
    {
        var seen = _client!.GetStats(t0, t1);
        return new ServiceView(seen.Count, seen.Errors + seen.Mismatches, seen.MaxUs / 1000, seen.LongestGapUs / 1000);
    }

    public void Stop()
    {
        if (_client is null) return;
        Stats = _client.StopAsync().GetAwaiter().GetResult();
        _client.Dispose();
        _client = null;
    }

    public void Dispose()
    {
        Stop();
        _endpoint.Dispose();
    }
}

/// <summary>
/// The boot-sector guest (guests/bootsector) checks itself: it rewrites every page of a range on
/// each pass and counts pages that do not hold what its last pass wrote. After each move this
/// waits (bounded) for the guest's next report on the destination's serial log: its pass count
/// must have grown past the last one seen (it runs there, on the memory it had) and its error
/// count must stay 0 (no page lost or stale).
/// </summary>
internal sealed class BootSectorWitness(TimeSpan progressBound) : IMtdWitness
{
    private long _passes, _firstPasses, _errors;
    private int _stalls;

    public GuestChecks Checks => new() { Passes = _passes - _firstPasses, Errors = _errors, Stalls = _stalls };

    public void Arrived(IVirtualMachine vm) { }

    public void Start(IVirtualMachine vm)
    {
        var first = NextReport(() => vm, -1) ?? throw new InvalidOperationException($"the boot-sector guest reported nothing within {progressBound.TotalSeconds:0} s (serial log {((QemuVm)vm).SerialLog})");
        (_firstPasses, _passes, _errors) = (first.Passes, first.Passes, first.Errors);
    }

    public ServiceView Moved(long t0, long t1, Func<IVirtualMachine?> at)
    {
        long before = _passes;
        if (NextReport(at, before) is not { } r)
        {
            _stalls++;
            return new ServiceView(0, 0, 0, 0);
        }
        _passes = r.Passes;
        long newErrors = Math.Max(0, r.Errors - _errors);
        _errors = Math.Max(_errors, r.Errors);
        return new ServiceView(r.Passes - before, newErrors, 0, 0);
    }

    /// <summary>The guest's first report past <paramref name="after"/> passes on its serial log, or null within the bound.</summary>
    private BootSectorReport? NextReport(Func<IVirtualMachine?> at, long after)
    {
        var sw = Stopwatch.StartNew();
        while (true)
        {
            if (at() is QemuVm vm && BootSectorSerial.Last(BootSectorSerial.Read(vm.SerialLog)) is { } r && r.Passes > after) return r;
            if (sw.Elapsed > progressBound) return null;
            Thread.Sleep(20); // polling a file another process writes: no event to wait on
        }
    }

    public void Stop() { }

    public void Dispose() { }
}
