using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Pipeline;

namespace LiveMig.Engine;

/// <summary>
/// The page loop of one round on one connection, shared by pre-copy and hybrid's pre-copy
/// rounds: every page set in the bitmap goes to the batch writer (read → encode → frame); the
/// caller frames the round around it. Several data streams have their own loop (SourceStreams).
/// </summary>
internal static class RoundPages
{
    /// <summary>
    /// Sends the pages set in <paramref name="pages"/>. With <paramref name="skipRewrittenInto"/>,
    /// a page the dirty log says was written again since its harvest is not sent but put back
    /// there (it is pending again anyway). Checks <paramref name="cancel"/> and reports progress
    /// every 256 pages, and once at the end. Returns the pages handled and those skipped.
    /// </summary>
    public static (long Done, long Skipped) Send(PageBitmap pages, PageBatchWriter batches, bool skipZero, PageBitmap? skipRewrittenInto, IDirtyLog log,
        Action<long> progress, CancellationToken cancel)
    {
        long done = 0, sinceProgress = 0, skipped = 0;
        for (long p = pages.NextSet(0); p >= 0; p = pages.NextSet(p + 1))
        {
            if (skipRewrittenInto is not null && log.WrittenSinceHarvest(p))
            {
                skipRewrittenInto.SetUnsynchronized(p);
                skipped++;
            }
            else
            {
                batches.Add(p, skipZero);
            }
            done++;
            if (++sinceProgress == 256)
            {
                sinceProgress = 0;
                cancel.ThrowIfCancellationRequested();
                progress(done);
            }
        }
        batches.Flush();
        progress(done);
        return (done, skipped);
    }
}
