using LiveMig.Memory;
using LiveMig.Policies;

namespace LiveMig.Core;

/// <summary>What one round put on the wire, as the sender counted it.</summary>
/// <param name="Pages">Page entries sent (zero markers included; pages skipped or left out as zero holes not).</param>
/// <param name="Bytes">Bytes the round put on the wire, its framing included.</param>
/// <param name="ZeroMarkers">Of <paramref name="Pages"/>, those sent as zero markers.</param>
/// <param name="Skipped">Pages not sent because they were written again since their harvest (put back as pending).</param>
public readonly record struct RoundSent(long Pages, long Bytes, long ZeroMarkers, long Skipped);

/// <summary>
/// What one round asks its sender to send: the arguments of <see cref="IRoundSender.SendRound"/>,
/// for a driver that sends them itself (<see cref="RoundController.StartLiveRound"/>).
/// </summary>
public readonly record struct RoundRequest(int Round, bool Final, PageBitmap Pages, long Count, bool SkipZero, PageBitmap? Rewritten);

/// <summary>
/// The mechanism that moves one round's pages: the real engine's connection (or data streams)
/// with its page pipeline, or a simulator's modelled link. The <see cref="RoundController"/>
/// decides what to send and when to stop; the sender only sends.
/// </summary>
public interface IRoundSender
{
    /// <summary>
    /// Sends the pages set in <paramref name="pages"/> (<paramref name="count"/> of them) as round
    /// <paramref name="round"/>; <paramref name="final"/> marks the stop-and-copy (the guest is
    /// paused). In round 0 zero pages need not be sent (<paramref name="skipZero"/>: the
    /// destination's memory starts zero). With <paramref name="rewritten"/>, a page the dirty log
    /// says was written again since its harvest is not sent but set there (it is pending again).
    /// </summary>
    RoundSent SendRound(int round, bool final, PageBitmap pages, long count, bool skipZero, PageBitmap? rewritten, CancellationToken cancel);

    /// <summary>
    /// Returns once the destination holds every page sent so far (Sync/SyncAck), so a round is
    /// timed by delivery and socket buffers drain while the guest still runs.
    /// </summary>
    void Sync(int round);

    /// <summary>Tells the destination the round's figures (RoundEnd).</summary>
    void EndRound(RoundStats stats);

    /// <summary>
    /// The switch-over's fixed cost as measured so far — the round trips of Prepare/Ready and
    /// Commit/Resumed and the VM state's time on the wire — added to every downtime estimate.
    /// </summary>
    TimeSpan SwitchoverCost { get; }
}
