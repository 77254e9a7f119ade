using System.Buffers.Binary;

namespace LiveMig.Protocol;

/// <summary>
/// VM state as a sequence of VmState frames (protocol version 2): a QEMU guest's device state can
/// be several MiB, more than one frame should carry. Each payload:
/// <code>
/// u64 total state length | u64 offset of this chunk | u8 last (1 = the final chunk) | up to 1 MiB of state bytes
/// </code>
/// Chunks come in order, back to back, each but the last non-empty; the last ends exactly at the total.
/// </summary>
public static class VmStateChunks
{
    public const int HeaderSize = 17;
    /// <summary>State bytes per chunk (the last may carry fewer).</summary>
    public const int ChunkBytes = 1 << 20;
    public const int MaxPayload = HeaderSize + ChunkBytes;

    /// <summary>Sends <paramref name="state"/> (not empty) as VmState chunks; returns the bytes put on the connection, headers included.</summary>
    public static long Send(FrameWriter frames, ReadOnlySpan<byte> state)
    {
        if (state.IsEmpty) throw new ArgumentException("VM state is empty", nameof(state));
        long before = frames.BytesWritten;
        for (int offset = 0; offset < state.Length; offset += ChunkBytes)
        {
            int n = Math.Min(ChunkBytes, state.Length - offset);
            Span<byte> p = frames.Begin(FrameType.VmState, HeaderSize + n);
            BinaryPrimitives.WriteUInt64LittleEndian(p, (ulong)state.Length);
            BinaryPrimitives.WriteUInt64LittleEndian(p[8..], (ulong)offset);
            p[16] = offset + n == state.Length ? (byte)1 : (byte)0;
            state.Slice(offset, n).CopyTo(p[HeaderSize..]);
            frames.Commit(HeaderSize + n);
        }
        return frames.BytesWritten - before;
    }
}

/// <summary>
/// The destination's side of <see cref="VmStateChunks"/>: checks each chunk against the first
/// (same total, next offset, inside the total, "last" exactly at its end) and assembles the
/// state. The total a source claims is checked against a limit before anything is allocated,
/// and the buffer grows with what actually arrives (to 4 MiB, then at most twice what arrived,
/// never past the claim), so a lying claim costs no memory it did not send.
/// </summary>
public sealed class VmStateAssembler(long maxBytes)
{
    private readonly long _max = Math.Min(maxBytes, Array.MaxLength);

    /// <summary>Buffer for the first chunks of a large state; it doubles from there.</summary>
    private const int InitialCapacity = 4 << 20;

    private byte[] _buffer = [];
    private long _total = -1;

    /// <summary>State bytes received so far.</summary>
    public long Received { get; private set; }
    /// <summary>VmState bytes read off the connection, frame headers included.</summary>
    public long WireBytes { get; private set; }
    public bool Started => _total >= 0;
    public bool Complete => _total >= 0 && Received == _total;

    /// <summary>The assembled state (exactly its length); only when <see cref="Complete"/>.</summary>
    public byte[] State => Complete ? _buffer : throw new InvalidOperationException("the VM state is not complete");

    /// <summary>Takes one VmState payload (frame <paramref name="frame"/>); true when it was the last.</summary>
    public bool Add(ReadOnlySpan<byte> payload, long frame)
    {
        if (Complete) throw new ProtocolException($"VmState (frame {frame}) after the last chunk of the VM state");
        if (payload.Length < VmStateChunks.HeaderSize) throw new ProtocolException($"VmState (frame {frame}): {payload.Length} bytes is shorter than its {VmStateChunks.HeaderSize}-byte header");
        ulong total = BinaryPrimitives.ReadUInt64LittleEndian(payload);
        ulong offset = BinaryPrimitives.ReadUInt64LittleEndian(payload[8..]);
        byte last = payload[16];
        var data = payload[VmStateChunks.HeaderSize..];
        if (_total < 0) Begin(total, frame);
        string where = $"VmState (frame {frame}, offset {offset})";
        if (total != (ulong)_total) throw new ProtocolException($"{where} claims a state of {total} bytes, the first chunk {_total}");
        if (offset != (ulong)Received) throw new ProtocolException($"{where} out of order: {Received} of {_total} bytes had arrived");
        if (last > 1) throw new ProtocolException($"{where}: last flag {last} is not 0 or 1");
        if (data.IsEmpty) throw new ProtocolException($"{where} carries no bytes");
        if ((ulong)data.Length > (ulong)_total - offset) throw new ProtocolException($"{where}: {data.Length} bytes run past the state's {_total} bytes");
        long end = Received + data.Length;
        if ((last == 1) != (end == _total))
            throw new ProtocolException(last == 1 ? $"{where}: last chunk ends at {end} of {_total} bytes (state truncated)" : $"{where} completes the {_total} bytes but is not marked last");
        Reserve(end);
        data.CopyTo(_buffer.AsSpan((int)Received));
        Received = end;
        WireBytes += FrameFormat.HeaderSize + payload.Length;
        return last == 1;
    }

    private void Begin(ulong total, long frame)
    {
        if (total == 0) throw new ProtocolException($"VmState (frame {frame}) announces an empty VM state");
        if (total > (ulong)_max)
            throw new ProtocolException($"VmState (frame {frame}) announces {Units.Bytes((long)Math.Min(total, long.MaxValue))} of VM state, over this destination's limit of {Units.Bytes(_max)}");
        _total = (long)total;
    }

    private void Reserve(long need)
    {
        if (need <= _buffer.Length) return;
        long capacity = Math.Min(_total, Math.Max(need, Math.Max(InitialCapacity, 2L * _buffer.Length)));
        var next = GC.AllocateUninitializedArray<byte>((int)capacity);
        _buffer.AsSpan(0, (int)Received).CopyTo(next);
        _buffer = next;
    }

    /// <summary>The error for a frame of another type arriving while the state is incomplete.</summary>
    public ProtocolException Interrupted(FrameType type, long frame) =>
        new($"VM state truncated: {type} (frame {frame}) after {Received} of {_total} bytes");

    /// <summary>Forgets a partial or complete state (a resumed migration's source sends it again).</summary>
    public void Reset()
    {
        _buffer = [];
        _total = -1;
        Received = 0;
    }
}
