using LiveMig.Core;
using LiveMig.Memory;
using LiveMig.Policies;

namespace LiveMig.Simulation;

/// <summary>
/// A modelled link for the <see cref="RoundController"/>: a round of n pages takes
/// n × <see cref="BytesPerPage"/> ÷ bandwidth of virtual time, a Sync one round trip. No page
/// is read and no byte moves; the clock is advanced instead. The seed of the simulator
/// (docs/architecture.md, "Where the simulator plugs in").
/// </summary>
public sealed class ModelLink : IRoundSender
{
    private readonly VirtualClock _clock;

    /// <param name="bytesPerSecond">The link's payload bandwidth.</param>
    /// <param name="latency">One-way delay: a Sync costs twice this, the switch-over (two round trips) four times.</param>
    /// <param name="bytesPerPage">Wire bytes a page costs (a raw page and its entry header by default; less with compression).</param>
    public ModelLink(VirtualClock clock, double bytesPerSecond, TimeSpan latency, double bytesPerPage = Pipeline.PageBatchWriter.EntryHeaderSize + GuestMemory.PageSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytesPerSecond);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(bytesPerPage);
        _clock = clock;
        BytesPerSecond = bytesPerSecond;
        Latency = latency;
        BytesPerPage = bytesPerPage;
    }

    public double BytesPerSecond { get; set; }
    public TimeSpan Latency { get; }
    public double BytesPerPage { get; }
    /// <summary>Bytes the model carried so far.</summary>
    public long BytesSent { get; private set; }
    public int Syncs { get; private set; }

    public RoundSent SendRound(int round, bool final, PageBitmap pages, long count, bool skipZero, PageBitmap? rewritten, CancellationToken cancel)
    {
        long bytes = (long)Math.Round(count * BytesPerPage);
        _clock.Advance(TimeSpan.FromSeconds(bytes / BytesPerSecond));
        BytesSent += bytes;
        return new RoundSent(count, bytes, 0, 0);
    }

    public void Sync(int round)
    {
        _clock.Advance(Latency * 2);
        Syncs++;
    }

    public void EndRound(RoundStats stats) { }

    public TimeSpan SwitchoverCost => Latency * 4;
}
