using System.Buffers;
using System.Runtime.ExceptionServices;
using LiveMig.Pipeline;
using LiveMig.Protocol;

namespace LiveMig.Engine;

/// <summary>
/// Places a connection's PageBatch frames on a thread of its own while the connection's thread
/// reads the next one: the socket is read while pages are copied (and fresh memory faulted).
/// Ownership: a frame's buffers (payload and entry hashes, pooled) pass from the reader to a
/// slot of this bounded ring on <see cref="Enqueue"/> (the reader takes the slot's spare
/// buffers in exchange) and stay there until the slot is placed; the ring owns its buffers and
/// returns them to the pool on <see cref="Dispose"/>. Every other frame waits for
/// <see cref="Drain"/>, so the state machine acts on a Sync, RoundEnd or Prepare with every page
/// before it placed, exactly as when one thread did both. A placement error (a corrupt page) is
/// rethrown on the connection's thread at its next <see cref="Enqueue"/> or <see cref="Drain"/>.
/// </summary>
internal sealed class PlacingThread : IDisposable
{
    /// <summary>Frames in flight between reader and placer: two is enough to overlap them; more only holds memory.</summary>
    private const int Slots = 2;

    private sealed class Slot
    {
        public byte[] Payload = [];
        public ulong[] Hashes = [];
        public int Length, HashCount;
        public long Frame;
    }

    private readonly PageBatchReader _placer;
    private readonly Slot[] _ring = [new(), new()];
    private readonly object _lock = new();
    private readonly Thread _thread;
    private int _head, _count; // _count slots from _head are full (the one at _head may be being placed)
    private bool _stop;
    private ExceptionDispatchInfo? _failure;

    public PlacingThread(PageBatchReader placer)
    {
        _placer = placer;
        _thread = new Thread(Loop) { IsBackground = true, Name = "livemig-placer" };
        _thread.Start();
    }

    /// <summary>Hands the PageBatch <paramref name="reader"/> just read (frame <paramref name="frame"/>, <paramref name="length"/> bytes) to the placer; waits while the ring is full.</summary>
    public void Enqueue(FrameReader reader, long frame, int length)
    {
        int hashes = reader.EntryHashes.Length;
        Slot slot;
        lock (_lock)
        {
            while (_count == Slots && _failure is null) Monitor.Wait(_lock);
            _failure?.Throw();
            slot = _ring[(_head + _count) % Slots];
        }
        // The slot is free: only this thread fills slots, and the placer never touches a free one.
        reader.Exchange(ref slot.Payload, ref slot.Hashes);
        (slot.Length, slot.HashCount, slot.Frame) = (length, hashes, frame);
        lock (_lock)
        {
            _count++;
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>Waits until every frame handed over is placed; rethrows a placement error.</summary>
    public void Drain()
    {
        lock (_lock)
        {
            while (_count > 0 && _failure is null) Monitor.Wait(_lock);
            _failure?.Throw();
        }
    }

    private void Loop()
    {
        while (true)
        {
            Slot slot;
            lock (_lock)
            {
                while (_count == 0 && !_stop) Monitor.Wait(_lock);
                if (_count == 0) return;
                slot = _ring[_head];
            }
            try { _placer.Apply(slot.Payload.AsSpan(0, slot.Length), slot.Frame, slot.Hashes.AsSpan(0, slot.HashCount)); }
            catch (Exception e)
            {
                lock (_lock)
                {
                    _failure = ExceptionDispatchInfo.Capture(e);
                    Monitor.PulseAll(_lock);
                }
                return; // nothing more is placed after a bad frame
            }
            lock (_lock)
            {
                _head = (_head + 1) % Slots;
                _count--;
                Monitor.PulseAll(_lock);
            }
        }
    }

    /// <summary>Stops the placer (frames not yet placed are dropped) and joins it; then gives the buffers back.</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            _stop = true;
            _count = Math.Min(_count, 1); // the one being placed, if any, completes
            if (_failure is not null) _count = 0;
            Monitor.PulseAll(_lock);
        }
        _thread.Join();
        foreach (var s in _ring)
        {
            if (s.Payload.Length > 0) ArrayPool<byte>.Shared.Return(s.Payload);
            if (s.Hashes.Length > 0) ArrayPool<ulong>.Shared.Return(s.Hashes);
            s.Payload = [];
            s.Hashes = [];
        }
    }
}
