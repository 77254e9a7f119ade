using System.Runtime.InteropServices;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// Chooses round 0's pages, for pre-copy and hybrid alike: every populated page (holes are zero
/// pages the destination already has: counted, never sent), less the pages the guest reports
/// free (free-page hinting, round 0 only, as QEMU does: they stay zero at the destination and
/// hash as zero pages on both sides) and those the destination already holds (gang dedup); then announces them (Extents) so
/// the destination can fault them in ahead. Call after dirty tracking started, so that a write
/// after any of these checks makes its page dirty and it is sent in a later round.
/// </summary>
internal static class FirstRound
{
    public static PageBitmap Choose(IVirtualMachine vm, SourcePipeline? pipeline, ConnectionRoundSender sender, bool announceExtents)
    {
        var memory = vm.Memory;
        var batches = sender.Batches;
        var pages = new PageBitmap(memory.PageCount);
        var extents = memory.DataExtents();
        long populated = 0;
        foreach (var (first, count) in extents) { pages.SetRange(first, count); populated += count; }
        batches.Counters.AddPages(PageEncoding.Zero, memory.PageCount - populated);
        if (pipeline is not null)
        {
            if (pipeline.Options.Capabilities != 0)
            {
                batches.Encoder = pipeline.CreateEncoder();
                batches.Link = pipeline.Link;
            }
            if (pipeline.Options.SkipFreePages) pipeline.SkipFreePages(free => vm.ReportFreePages(free), pages, populated, batches.Counters);
            if (pipeline.Options.Dedup) GangDedup(vm, pipeline, pages, sender);
        }
        if (announceExtents)
        {
            var runs = pipeline is null ? extents : pages.Runs();
            if (runs.Count <= ExtentsMessage.MaxExtents)
            {
                var buf = sender.Frames.Begin(FrameType.Extents, runs.Count * 8);
                sender.Frames.CommitNow(ExtentsMessage.Write(buf, runs)); // metadata, not memory: not held back by the cap
            }
        }
        return pages;
    }

    /// <summary>
    /// Gang dedup before round 0: tells the destination the content hashes of the pages about to
    /// be sent; it fills those it already holds (from any VM it received, verified by hash) and
    /// says which. Those pages are not sent in round 0.
    /// </summary>
    private static long GangDedup(IVirtualMachine vm, SourcePipeline pipeline, PageBitmap toSend, ConnectionRoundSender sender)
    {
        var candidates = pipeline.GangCandidates(vm.Memory, toSend);
        if (candidates.Count == 0) return 0;
        var buffer = new byte[4 + DedupQuery.MaxEntries * DedupQuery.EntrySize];
        long filled = 0;
        for (int first = 0; first < candidates.Count; first += DedupQuery.MaxEntries)
        {
            int n = Math.Min(DedupQuery.MaxEntries, candidates.Count - first);
            var chunk = CollectionsMarshal.AsSpan(candidates).Slice(first, n);
            sender.Frames.Send(FrameType.DedupQuery, buffer.AsSpan(0, DedupQuery.Write(buffer, chunk)));
            var type = sender.Reader.Read(out var payload);
            if (type == FrameType.Error) throw new MigrationAbort($"destination {ErrorMessage.Parse(payload).Text}");
            if (type != FrameType.DedupAnswer) throw new ProtocolException($"expected DedupAnswer, got {type}");
            bool[] answer = DedupAnswer.Parse(payload, n);
            for (int i = 0; i < n; i++)
            {
                if (!answer[i]) continue;
                var (page, hash) = chunk[i];
                toSend.Clear(page);
                sender.Batches.Hashes?.Set(page, vm.Memory.Page(page));
                pipeline.GangFilled(page, hash);
                filled++;
            }
        }
        sender.Batches.Counters.AddPages(PageEncoding.Dedup, filled);
        return filled;
    }
}
