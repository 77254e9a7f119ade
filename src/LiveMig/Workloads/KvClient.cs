using System.Buffers.Binary;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace LiveMig.Workloads;

/// <summary>What a <see cref="KvClient"/> does; the defaults make a closed-loop 50/50 GET/PUT mix.</summary>
public sealed record KvClientOptions
{
    /// <summary>Key space: keys KeyBase .. KeyBase+Keys-1 (separate bases keep several clients' models apart).</summary>
    public long Keys { get; init; } = 1024;
    public ulong KeyBase { get; init; }
    public double PutFraction { get; init; } = 0.5;
    /// <summary>PUT value lengths are drawn in [Min, Max]; Max must not exceed the table's value size.</summary>
    public int MinValueLength { get; init; } = 16;
    public int MaxValueLength { get; init; } = 256;
    public ulong Seed { get; init; } = 1;
    /// <summary>Requests per second; 0 = closed loop (next request as soon as the reply is in). Never catches up after a stall.</summary>
    public double Rate { get; init; }
    public long MaxRequests { get; init; } = 10_000_000;
    public TimeSpan MaxDuration { get; init; } = TimeSpan.FromMinutes(10);
    /// <summary>How long one reply may take before the client gives up (longer than the endpoint's own timeout).</summary>
    public TimeSpan ResponseTimeout { get; init; } = TimeSpan.FromSeconds(60);
}

public enum KvOutcome : byte
{
    Ok,
    /// <summary>A GET disagreed with what this client last PUT for the key.</summary>
    Mismatch,
    /// <summary>An error status, or the connection failed (then the client stops).</summary>
    Error,
}

/// <summary>One request: when its reply arrived and how long it took (Stopwatch ticks).</summary>
public readonly record struct KvSample(long Completed, long LatencyTicks, KvOp Op, KvOutcome Outcome);

/// <summary>Latency summary over all requests or a time window; times in microseconds.</summary>
public sealed record KvClientStats
{
    public long Count { get; init; }
    public long Errors { get; init; }
    public long Mismatches { get; init; }
    public double P50Us { get; init; }
    public double P99Us { get; init; }
    public double MaxUs { get; init; }
    /// <summary>The longest single request: the downtime an application saw.</summary>
    public double ObservedDowntimeUs => MaxUs;
    /// <summary>The longest time between consecutive replies (counts stalls between requests too).</summary>
    public double LongestGapUs { get; init; }
    /// <summary>Stopwatch timestamp at which the longest gap ended (0 if fewer than two replies).</summary>
    public long LongestGapEnd { get; init; }
    /// <summary>Replies per second over the span of the replies counted.</summary>
    public double Throughput { get; init; }
    /// <summary>Why the client stopped early (connection lost, reply timeout), or null.</summary>
    public string? Failure { get; init; }
    /// <summary>The first GET that disagreed with the client's model, described.</summary>
    public string? FirstMismatch { get; init; }

    public override string ToString() =>
        $"{Count} requests, {Errors} errors, {Mismatches} mismatches, p50 {P50Us:F0} us, p99 {P99Us:F0} us, max {MaxUs:F0} us, longest gap {LongestGapUs:F0} us";
}

/// <summary>
/// A client outside the VM: one connection to a <see cref="KvEndpoint"/>, a seeded mix of GET and
/// PUT, and a record of every request's latency, so that the downtime an application sees during
/// a migration can be measured. It remembers the last value it PUT for each key (as a version
/// number: values are derived from (seed, key, version), so the model costs 8 bytes a key) and
/// checks every GET against it, which shows whether the store's contents survived the move.
/// </summary>
public sealed class KvClient : IDisposable
{
    private const ulong KeyMul = 0x9E3779B97F4A7C15UL, VersionMul = 0xC2B2AE3D27D4EB4FUL;

    private readonly IPEndPoint _endpoint;
    private readonly KvClientOptions _o;
    private readonly ulong[] _versions;
    private readonly Lock _samplesLock = new();
    private KvSample[] _samples;
    private long _count;
    private string? _failure, _firstMismatch;
    private Socket? _socket;
    private Task? _loop;
    private volatile bool _stopRequested;
    private readonly Lock _waitLock = new();
    private long _waitTarget = long.MaxValue;
    private TaskCompletionSource<bool>? _waiter;
    private bool _ended;

    public KvClient(IPEndPoint endpoint, KvClientOptions? options = null)
    {
        _o = options ?? new KvClientOptions();
        if (!IPAddress.IsLoopback(endpoint.Address)) throw new ArgumentException("the kv client only talks to a loopback address", nameof(endpoint));
        if (_o.Keys < 1 || _o.Keys > 1 << 24) throw new ArgumentOutOfRangeException(nameof(options), "Keys must be 1..16M");
        if (_o.MinValueLength < 0 || _o.MaxValueLength > KvProtocol.MaxValueLength || _o.MinValueLength > _o.MaxValueLength)
            throw new ArgumentOutOfRangeException(nameof(options), $"value lengths must satisfy 0 <= min <= max <= {KvProtocol.MaxValueLength}");
        if (_o.PutFraction is < 0 or > 1 || double.IsNaN(_o.PutFraction)) throw new ArgumentOutOfRangeException(nameof(options), "PutFraction must be in [0, 1]");
        if (_o.Rate < 0 || double.IsNaN(_o.Rate)) throw new ArgumentOutOfRangeException(nameof(options), "Rate must be >= 0");
        if (_o.MaxRequests < 1) throw new ArgumentOutOfRangeException(nameof(options), "MaxRequests must be >= 1");
        _endpoint = endpoint;
        _versions = new ulong[_o.Keys];
        _samples = new KvSample[(int)Math.Min(_o.MaxRequests, 1 << 16)];
    }

    /// <summary>Replies received so far.</summary>
    public long Completed => Interlocked.Read(ref _count);
    /// <summary>Stopwatch timestamp when the loop began (0 before <see cref="Start"/>).</summary>
    public long StartedAt { get; private set; }
    /// <summary>Ends when the loop ends: stopped, a bound reached, or the connection failed.</summary>
    public Task Completion => _loop ?? Task.CompletedTask;

    /// <summary>Connects (synchronously, so a refused connection throws here) and runs the loop on its own thread.</summary>
    public void Start()
    {
        if (_loop is not null) throw new InvalidOperationException("client already started");
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
        try
        {
            s.ReceiveTimeout = (int)Math.Clamp(_o.ResponseTimeout.TotalMilliseconds, 1, int.MaxValue);
            s.Connect(_endpoint);
        }
        catch
        {
            s.Dispose();
            throw;
        }
        _socket = s;
        StartedAt = Stopwatch.GetTimestamp();
        _loop = Task.Factory.StartNew(Run, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>Completes true once <paramref name="count"/> replies are in, false if the client ends first. One waiter at a time.</summary>
    public Task<bool> WaitForCompletedAsync(long count)
    {
        lock (_waitLock)
        {
            if (Completed >= count) return Task.FromResult(true);
            if (_ended) return Task.FromResult(false);
            if (_waiter is not null) throw new InvalidOperationException("already waiting");
            var waiter = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            _waiter = waiter;
            Interlocked.Exchange(ref _waitTarget, count);
            // A reply recorded between the check above and publishing the target did not see it.
            if (Completed >= count) { _waiter = null; _waitTarget = long.MaxValue; waiter.TrySetResult(true); }
            return waiter.Task;
        }
    }

    /// <summary>Lets the request in flight finish (bounded by the reply timeout), ends the loop and returns the stats over everything.</summary>
    public async Task<KvClientStats> StopAsync()
    {
        _stopRequested = true;
        if (_loop is not null) await _loop.ConfigureAwait(false);
        return GetStats();
    }

    /// <summary>Stats over the replies that arrived in [<paramref name="from"/>, <paramref name="to"/>) (Stopwatch timestamps). Safe while running.</summary>
    public KvClientStats GetStats(long from = long.MinValue, long to = long.MaxValue)
    {
        lock (_samplesLock)
        {
            int n = (int)_count;
            var latencies = new List<long>();
            long errors = 0, mismatches = 0, gap = 0, gapEnd = 0, prev = 0, first = 0, last = 0;
            for (int i = 0; i < n; i++)
            {
                ref readonly KvSample s = ref _samples[i];
                if (s.Completed < from || s.Completed >= to) continue;
                latencies.Add(s.LatencyTicks);
                if (s.Outcome == KvOutcome.Error) errors++;
                else if (s.Outcome == KvOutcome.Mismatch) mismatches++;
                if (latencies.Count == 1) first = s.Completed;
                else if (s.Completed - prev > gap) { gap = s.Completed - prev; gapEnd = s.Completed; }
                prev = last = s.Completed;
            }
            latencies.Sort();
            return new KvClientStats
            {
                Count = latencies.Count,
                Errors = errors,
                Mismatches = mismatches,
                P50Us = Us(Percentile(latencies, 0.50)),
                P99Us = Us(Percentile(latencies, 0.99)),
                MaxUs = Us(latencies.Count == 0 ? 0 : latencies[^1]),
                LongestGapUs = Us(gap),
                LongestGapEnd = gapEnd,
                Throughput = latencies.Count > 1 && last > first ? (latencies.Count - 1) * (double)Stopwatch.Frequency / (last - first) : 0,
                Failure = _failure,
                FirstMismatch = _firstMismatch,
            };
        }
    }

    /// <summary>A copy of every sample so far.</summary>
    public KvSample[] Samples()
    {
        lock (_samplesLock) return _samples.AsSpan(0, (int)_count).ToArray();
    }

    private static double Us(long ticks) => ticks * 1e6 / Stopwatch.Frequency;

    /// <summary>Nearest-rank percentile of sorted values.</summary>
    private static long Percentile(List<long> sorted, double q) =>
        sorted.Count == 0 ? 0 : sorted[Math.Clamp((int)Math.Ceiling(q * sorted.Count) - 1, 0, sorted.Count - 1)];

    private void Run()
    {
        var s = _socket!;
        var send = new byte[KvProtocol.RequestHeaderSize + KvProtocol.MaxValueLength];
        var recv = new byte[KvProtocol.MaxValueLength];
        var expected = new byte[KvProtocol.MaxValueLength];
        var rng = new Xoshiro256(_o.Seed);
        ulong putSeq = 0;
        long interval = _o.Rate > 0 ? Math.Max(1, (long)(Stopwatch.Frequency / _o.Rate)) : 0;
        long deadline = StartedAt + (long)Math.Min(_o.MaxDuration.TotalSeconds * Stopwatch.Frequency, long.MaxValue / 2);
        long next = StartedAt;
        try
        {
            while (!_stopRequested && _count < _o.MaxRequests)
            {
                long now = Stopwatch.GetTimestamp();
                if (now >= deadline) break;
                if (interval > 0)
                {
                    now = WaitUntil(next);
                    next = Math.Max(next + interval, now); // no catching up after a stall
                }
                long idx = rng.NextBelow(_o.Keys);
                ulong key = _o.KeyBase + (ulong)idx;
                bool put = rng.NextDouble() < _o.PutFraction;
                ulong version = put ? ++putSeq : _versions[idx];
                int valueLength = 0;
                if (put)
                {
                    valueLength = MakeValue(key, version, send.AsSpan(KvProtocol.RequestHeaderSize));
                    KvProtocol.WriteRequestHeader(send, KvOp.Put, key, valueLength);
                }
                else KvProtocol.WriteRequestHeader(send, KvOp.Get, key, 0);

                long t0 = Stopwatch.GetTimestamp();
                KvStatus status;
                int length;
                try
                {
                    SendAll(s, send.AsSpan(0, KvProtocol.RequestHeaderSize + valueLength));
                    ReadExactly(s, recv.AsSpan(0, KvProtocol.ResponseHeaderSize));
                    status = (KvStatus)recv[0];
                    length = BinaryPrimitives.ReadUInt16LittleEndian(recv.AsSpan(1));
                    bool lengthOk = status == KvStatus.Ok && !put ? length <= KvProtocol.MaxValueLength : length == 0;
                    if (!lengthOk || status > KvStatus.Unavailable) throw new InvalidDataException($"bad reply: status {(byte)status}, length {length}");
                    ReadExactly(s, recv.AsSpan(0, length));
                }
                catch (Exception e) when (e is SocketException or InvalidDataException or ObjectDisposedException)
                {
                    // The request's fate is unknown: record it as an error and stop (the model may be stale).
                    _failure = e is SocketException { SocketErrorCode: SocketError.TimedOut } ? $"no reply within {_o.ResponseTimeout}" : e.Message;
                    long t = Stopwatch.GetTimestamp();
                    Record(new KvSample(t, t - t0, put ? KvOp.Put : KvOp.Get, KvOutcome.Error));
                    break;
                }
                long done = Stopwatch.GetTimestamp();

                KvOutcome outcome;
                if (put)
                {
                    outcome = status == KvStatus.Ok ? KvOutcome.Ok : KvOutcome.Error;
                    if (status == KvStatus.Ok) _versions[idx] = version; // an error reply means not applied
                }
                else if (status is KvStatus.Ok or KvStatus.NotFound)
                {
                    outcome = KvOutcome.Ok;
                    if (version != 0) // a key this client never PUT may hold anything
                    {
                        int want = MakeValue(key, version, expected);
                        if (status != KvStatus.Ok || !recv.AsSpan(0, length).SequenceEqual(expected.AsSpan(0, want)))
                        {
                            outcome = KvOutcome.Mismatch;
                            _firstMismatch ??= status != KvStatus.Ok
                                ? $"GET {key}: {status}, expected version {version}"
                                : $"GET {key}: {length} bytes differ from version {version} ({want} bytes)";
                        }
                    }
                }
                else outcome = KvOutcome.Error;
                Record(new KvSample(done, done - t0, put ? KvOp.Put : KvOp.Get, outcome));
            }
        }
        finally
        {
            try { s.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
            s.Dispose();
            lock (_waitLock)
            {
                _ended = true;
                _waiter?.TrySetResult(Completed >= _waitTarget);
                _waiter = null;
            }
        }
    }

    private void Record(in KvSample sample)
    {
        long n;
        lock (_samplesLock)
        {
            if (_count == _samples.Length) Array.Resize(ref _samples, (int)Math.Min((long)_samples.Length * 2, Math.Min(_o.MaxRequests, Array.MaxLength)));
            _samples[_count] = sample;
            n = _count + 1;
            Interlocked.Exchange(ref _count, n); // a full fence: ordered before the read of _waitTarget below (Dekker with the waiter)
        }
        if (n >= Volatile.Read(ref _waitTarget))
        {
            lock (_waitLock)
            {
                if (_waiter is not null && n >= _waitTarget)
                {
                    _waiter.TrySetResult(true);
                    _waiter = null;
                    _waitTarget = long.MaxValue;
                }
            }
        }
    }

    /// <summary>The value for (seed, key, version): length and bytes both derived, so the client needs no copy of it.</summary>
    private int MakeValue(ulong key, ulong version, Span<byte> into)
    {
        ulong x = _o.Seed ^ key * KeyMul ^ version * VersionMul;
        int span = _o.MaxValueLength - _o.MinValueLength + 1;
        int length = _o.MinValueLength + (int)(Xoshiro256.SplitMix(ref x) % (ulong)span);
        int i = 0;
        for (; i + 8 <= length; i += 8) BinaryPrimitives.WriteUInt64LittleEndian(into[i..], Xoshiro256.SplitMix(ref x));
        ulong tail = Xoshiro256.SplitMix(ref x);
        for (; i < length; i++, tail >>= 8) into[i] = (byte)tail;
        return length;
    }

    /// <summary>Sleeps while far from the target time, spins the last stretch (Thread.Sleep has ~1 ms granularity).</summary>
    private long WaitUntil(long target)
    {
        long twoMs = Stopwatch.Frequency / 500;
        var spin = new SpinWait();
        while (true)
        {
            long now = Stopwatch.GetTimestamp();
            if (now >= target || _stopRequested) return now;
            if (target - now > twoMs) Thread.Sleep(1);
            else spin.SpinOnce(sleep1Threshold: -1);
        }
    }

    private static void SendAll(Socket s, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty) data = data[s.Send(data)..];
    }

    private static void ReadExactly(Socket s, Span<byte> into)
    {
        while (!into.IsEmpty)
        {
            int n = s.Receive(into);
            if (n == 0) throw new SocketException((int)SocketError.ConnectionReset);
            into = into[n..];
        }
    }

    /// <summary>Aborts: closes the connection at once (a request in flight is recorded as an error).</summary>
    public void Dispose()
    {
        _stopRequested = true;
        try { _socket?.Shutdown(SocketShutdown.Both); } catch (SocketException) { } catch (ObjectDisposedException) { }
        try { _loop?.Wait(); } catch (AggregateException) { }
    }
}
