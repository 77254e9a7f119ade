using System.Buffers.Binary;

namespace LiveMig.Workloads;

public enum KvOp : byte { Get = 1, Put = 2 }

public enum KvStatus : byte
{
    Ok = 0,
    NotFound = 1,
    /// <summary>PUT of a new key into a table that holds its capacity of keys.</summary>
    Full = 2,
    /// <summary>PUT value longer than the table's value size.</summary>
    TooLarge = 3,
    /// <summary>No running VM served the request in time (or the VM went away); the request was not applied.</summary>
    Unavailable = 4,
}

/// <summary>
/// The kv wire format, little-endian. Request: op u8, key u64, value length u16, value bytes
/// (GET carries none). Response: status u8, value length u16, value bytes (only GET+Ok carries any).
/// </summary>
public static class KvProtocol
{
    public const int RequestHeaderSize = 11;
    public const int ResponseHeaderSize = 3;
    /// <summary>Largest value anywhere: one slot (16-byte slot header + value) must fit in a page.</summary>
    public const int MaxValueLength = 4096 - KvTable.SlotHeaderSize;

    public static void WriteRequestHeader(Span<byte> into, KvOp op, ulong key, int valueLength)
    {
        into[0] = (byte)op;
        BinaryPrimitives.WriteUInt64LittleEndian(into[1..], key);
        BinaryPrimitives.WriteUInt16LittleEndian(into[9..], (ushort)valueLength);
    }

    public static void WriteResponseHeader(Span<byte> into, KvStatus status, int valueLength)
    {
        into[0] = (byte)status;
        BinaryPrimitives.WriteUInt16LittleEndian(into[1..], (ushort)valueLength);
    }
}

/// <summary>
/// One request in flight through the VM's "virtual NIC": filled by whoever submits it, served by
/// a vCPU (which writes the status and, for GET, the value into <see cref="Buffer"/>), then
/// handed back. Reusable after a completed <see cref="Wait"/> via <see cref="Reset"/>; after an
/// abandoned wait it may still sit in some queue, so it must not be reused.
/// </summary>
public sealed class KvRequest
{
    private const int Idle = 0, Queued = 1, Taken = 2, Done = 3, Abandoned = 4;

    private readonly ManualResetEventSlim _done = new(false);
    private int _state;

    public KvOp Op { get; private set; }
    public ulong Key { get; private set; }
    /// <summary>PUT: the value to store; GET+Ok: the value found.</summary>
    public byte[] Buffer { get; } = new byte[KvProtocol.MaxValueLength];
    public int ValueLength { get; internal set; }
    public KvStatus Status { get; internal set; }
    public ReadOnlySpan<byte> Value => Buffer.AsSpan(0, ValueLength);

    /// <summary>Sets the request up; the value (PUT) must already be in <see cref="Buffer"/>.</summary>
    public void Prepare(KvOp op, ulong key, int valueLength)
    {
        if (Volatile.Read(ref _state) is not (Idle or Done)) throw new InvalidOperationException("request is in flight");
        if ((uint)valueLength > KvProtocol.MaxValueLength) throw new ArgumentOutOfRangeException(nameof(valueLength));
        Op = op;
        Key = key;
        ValueLength = op == KvOp.Put ? valueLength : 0;
        Status = KvStatus.Unavailable;
        _done.Reset();
        Volatile.Write(ref _state, Idle);
    }

    public void Prepare(KvOp op, ulong key, ReadOnlySpan<byte> value)
    {
        value.CopyTo(Buffer);
        Prepare(op, key, value.Length);
    }

    /// <summary>
    /// Waits until a vCPU has served the request: true then. On timeout or cancellation the request
    /// is abandoned unless a vCPU already took it (then its imminent completion is awaited):
    /// false, <see cref="Status"/> is <see cref="KvStatus.Unavailable"/> and it was not applied.
    /// </summary>
    public bool Wait(TimeSpan timeout, CancellationToken cancel = default)
    {
        try
        {
            if (_done.Wait(timeout, cancel)) return true;
        }
        catch (OperationCanceledException) { }
        int was = Interlocked.CompareExchange(ref _state, Abandoned, Queued);
        if (was == Queued)
        {
            Status = KvStatus.Unavailable;
            return false;
        }
        if (was == Idle) throw new InvalidOperationException("request was never submitted");
        // A vCPU holds it: serving one request takes microseconds, and a vCPU finishes its Step before parking.
        _done.Wait();
        return true;
    }

    internal void MarkQueued()
    {
        if (Interlocked.CompareExchange(ref _state, Queued, Idle) != Idle) throw new InvalidOperationException("request submitted twice without Prepare");
    }

    /// <summary>Claims the request for serving; false when its submitter gave up on it.</summary>
    internal bool TryTake() => Interlocked.CompareExchange(ref _state, Taken, Queued) == Queued;

    internal void Complete(KvStatus status)
    {
        Status = status;
        if (status != KvStatus.Ok || Op != KvOp.Get) ValueLength = 0;
        Volatile.Write(ref _state, Done);
        _done.Set();
    }

    /// <summary>Fails a request that will never be served (its VM is gone).</summary>
    internal void Fail()
    {
        if (TryTake()) Complete(KvStatus.Unavailable);
    }
}
