using System.Collections.Concurrent;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Transport;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>What <see cref="IncomingMigration"/> hands over at the switch to post-copy.</summary>
internal sealed record PostCopyHandover(
    Stream Stream, FrameReader Reader, FrameWriter Frames, GuestMemory Memory, PageBatchReader Placer,
    HelloMessage Hello, IVmFactory Factory, IncomingVm Vm, DestinationReport Report, int CurrentRound, ParkedThreads? Threads);

/// <summary>
/// The destination side of post-copy: from the switch (PostCopyStart) to the last page. Sets up
/// demand paging over the guest memory (<see cref="DemandPager"/>: portable present bitmap, or
/// userfaultfd with the native fault-service thread), restores and resumes the VM at once, places
/// pushed pages from the main connection and requested pages from the page-request connection,
/// and verifies at the end. After the switch a broken connection pauses only the vCPUs that
/// fault; the session waits for the source to reconnect (docs/protocol.md, "Recovery").
/// </summary>
internal sealed unsafe class PostCopyIncoming : IPageRequester
{
    /// <summary>Diagnostics for tests: connection events of every session in this process.</summary>
    internal static Action<string>? Trace;

    private readonly DestinationOptions _options;
    private readonly ConcurrentDictionary<Guid, PostCopyIncoming> _sessions;
    private readonly HelloMessage _hello;
    private readonly Lock _lock = new();
    private readonly Lock _sendLock = new();
    private Channel? _priority;
    private Channel? _reopenedMain;
    private Channel? _currentMain;
    private readonly ManualResetEventSlim _mainArrived = new(false);
    private readonly ManualResetEventSlim _priorityArrived = new(false);
    private DemandPager? _pager;
    private bool LateZerosOn => (_hello.Requested & Capabilities.LateZeros) != 0; // requested: a source the destination did not accept it from sends a bitmap and no LateZeros, so this is safe either way
    private UffdDemandPager.Preparation? _prepared; // the fault service made before the pause, until a pager takes it
    private Thread? _priorityThread;
    private volatile bool _priorityBroken;
    private volatile bool _resumed, _finished;
    private long _placedFromPush, _placedFromRequests, _duplicates;
    /// <summary>Pages placed by encoding: pushed (the main connection's reader) and requested (the page-request readers, added as each ends).</summary>
    private readonly EncodingCounters _pushed = new(), _requested = new();
    /// <summary>Every page-request connection so far, for the bytes they carried.</summary>
    private readonly List<Channel> _priorityChannels = [];
    private int _networkFaults;

    private PostCopyIncoming(ConcurrentDictionary<Guid, PostCopyIncoming> sessions, HelloMessage hello, DestinationOptions options)
    {
        _sessions = sessions;
        _hello = hello;
        _options = options;
    }

    /// <summary>One connection of the session; <see cref="Released"/> lets the listener thread that accepted it go.</summary>
    private sealed class Channel(Stream stream, FrameReader reader, FrameWriter frames, ChannelKind kind)
    {
        public Stream Stream { get; } = stream;
        public FrameReader Reader { get; } = reader;
        public FrameWriter Frames { get; } = frames;
        public ChannelKind Kind { get; } = kind;
        public ManualResetEventSlim Released { get; } = new(false);
        public volatile bool Broken;
        /// <summary>A reader (managed thread or native helper) serves it; set under the session lock.</summary>
        public bool Serviced;

        public void Close()
        {
            Broken = true;
            try { Stream.Dispose(); } catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException) { }
        }
    }

    /// <summary>Called when a Hello negotiated post-copy: the page-request connection may attach from now on.</summary>
    public static PostCopyIncoming Register(DestinationSessions sessions, HelloMessage hello, DestinationOptions options)
    {
        var s = new PostCopyIncoming(sessions.PostCopy, hello, options);
        sessions.PostCopy[hello.MigrationId] = s;
        return s;
    }

    /// <summary>
    /// Before the pause (at the first frame after the Hello): the userfaultfd and the native
    /// fault thread for this process's own mapping of <paramref name="memory"/>, so the switch only
    /// registers the memory. Nothing is registered yet: hybrid's rounds still write the memory.
    /// Where it cannot be made the switch tries again and falls back as it always did.
    /// </summary>
    public void Prepare(GuestMemory memory)
    {
        if (_options.PostCopy.Mode is not (DemandPagingMode.Userfaultfd or DemandPagingMode.Auto)) return;
        lock (_lock) _prepared ??= UffdDemandPager.Prepare(memory, out _);
    }

    private void DropPreparation()
    {
        UffdDemandPager.Preparation? p;
        lock (_lock) (p, _prepared) = (_prepared, null);
        p?.Dispose();
    }

    public void Unregister() => _sessions.TryRemove(new KeyValuePair<Guid, PostCopyIncoming>(_hello.MigrationId, this));

    /// <summary>The migration failed before the switch, or ended in a stop-and-copy without one: forget it and let its page-request connection go.</summary>
    public void Abort()
    {
        Unregister();
        DropPreparation();
        Channel? p;
        lock (_sendLock) { p = _priority; _priority = null; }
        p?.Close();
        p?.Released.Set();
    }

    /// <summary>
    /// A connection whose first frame is Attach: joins the migration it names and blocks until
    /// the migration no longer needs it (the listener closes it when this returns).
    /// </summary>
    public static void ServeAttach(DestinationSessions sessions, AttachMessage m, Stream stream, FrameReader reader, FrameWriter frames)
    {
        if (!sessions.PostCopy.TryGetValue(m.MigrationId, out var session))
            throw new ProtocolException($"Attach: no migration {m.MigrationId} is waiting here (it completed, failed, or its resume window ran out)");
        session.Attach(new Channel(stream, reader, frames, m.Channel));
    }

    private void Attach(Channel ch)
    {
        if (ch.Kind == ChannelKind.Priority)
        {
            // Answers come only when a vCPU faults: an idle page-request connection is not a dead one.
            if (ch.Stream.CanTimeout) ch.Stream.ReadTimeout = Timeout.Infinite;
            Span<byte> buf = stackalloc byte[8];
            ch.Frames.Send(FrameType.Attached, buf[..new AttachedMessage(ChannelKind.Priority, _resumed).Write(buf)]);
            Channel? old;
            lock (_sendLock)
            {
                old = _priority;
                _priority = ch;
                _priorityBroken = false;
            }
            _priorityArrived.Set();
            lock (_priorityChannels) _priorityChannels.Add(ch);
            if (old is not null) Trace?.Invoke("priority attach replaces an open channel");
            lock (_lock) if (_pager is not null) StartPriorityService(ch); // (userfaultfd: the native thread moves to it)
            ClosePriority(old);
        }
        else
        {
            Channel? stale;
            lock (_lock)
            {
                stale = _currentMain;
                _reopenedMain?.Close();
                _reopenedMain = ch;
                _mainArrived.Set();
            }
            // The source only reconnects when it saw the old main connection fail: make sure this side sees it too.
            Trace?.Invoke($"main attach (stale open: {stale is not null && !stale.Broken})");
            stale?.Close();
        }
        ch.Released.Wait();
    }

    // ---- requests (portable pager) ----------------------------------------------------------

    public void Request(long page)
    {
        lock (_sendLock)
        {
            var ch = _priority;
            if (ch is null || ch.Broken) return; // asked again when a connection attaches
            try
            {
                Span<byte> buf = stackalloc byte[8];
                ch.Frames.Send(FrameType.PageRequest, buf[..PageRequestMessage.Write(buf, [page])]);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException or NotSupportedException)
            {
                Trace?.Invoke($"request send: {e.GetType().Name}: {e.Message}");
                _priorityBroken = true;
                ch.Close();
            }
        }
    }

    private void ResendOutstanding()
    {
        if (_pager is not PortableDemandPager p) return;
        var pages = p.Outstanding();
        lock (_sendLock)
        {
            var ch = _priority;
            if (ch is null || ch.Broken) return;
            try
            {
                var buf = new byte[4 + PageRequestMessage.MaxPages * 4];
                for (int i = 0; i < pages.Count; i += PageRequestMessage.MaxPages)
                {
                    var slice = pages.GetRange(i, Math.Min(PageRequestMessage.MaxPages, pages.Count - i)).ToArray();
                    ch.Frames.Send(FrameType.PageRequest, buf.AsSpan(0, PageRequestMessage.Write(buf, slice)));
                }
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
            {
                _priorityBroken = true;
                ch.Close();
            }
        }
    }

    // ---- the page-request connection's reader ------------------------------------------------

    private void StartPriorityService(Channel ch)
    {
        if (ch.Serviced) return;
        ch.Serviced = true;
        if (_pager is UffdDemandPager u)
        {
            u.ServeConnection(ch.Stream, () =>
            {
                Trace?.Invoke($"page-request connection dropped by the native thread ({u.DropReason}; {u.NativeCounters.Error})");
                if (!_finished) _priorityBroken = true;
                ch.Close();
                ch.Released.Set();
            });
            return;
        }
        var t = new Thread(() => PriorityLoop(ch)) { IsBackground = true, Name = "livemig-postcopy-answers" };
        // Published once started: a recovery on another thread joins it, and joining an unstarted thread throws
        // (it ended the migration, "Thread has not been started", when a source reattached and failed at once).
        t.Start();
        _priorityThread = t;
        ResendOutstanding();
    }

    private void PriorityLoop(Channel ch)
    {
        Linux.Native.RaiseCurrentThread(); // a faulting vCPU waits on this thread (where permitted)
        byte* scratch = (byte*)NativeMemory.Alloc(ScratchBytes);
        var placed = new EncodingCounters(); // this reader's: another may overlap it briefly after a re-attach
        try
        {
            while (!ch.Broken)
            {
                var type = ch.Reader.Read(out var payload);
                if (type == FrameType.LateZeros && LateZerosOn) { MarkLateZeros(payload, ch.Reader.FramesRead - 1); continue; }
                if (type != FrameType.PageBatch) throw new ProtocolException($"unexpected {type} on the page-request connection");
                long n = PlaceBatch(payload, ch.Reader.FramesRead - 1, scratch, BasicPageDecoder.Instance, placed);
                Interlocked.Add(ref _placedFromRequests, n);
            }
        }
        catch (Exception e) when (e is IOException or ProtocolException or ObjectDisposedException or SocketException)
        {
            Trace?.Invoke($"page-request reader: {e.GetType().Name}: {e.Message}");
            if (!_finished) _priorityBroken = true;
            ch.Close();
        }
        finally
        {
            NativeMemory.Free(scratch);
            lock (_requested) _requested.Merge(placed);
            ch.Released.Set();
        }
    }

    /// <summary>One LateZeros frame (portable pager; the native thread reads its own): the pages it lists become present as zero pages.</summary>
    private void MarkLateZeros(ReadOnlySpan<byte> payload, long frame)
    {
        var pager = (PortableDemandPager)_pager!;
        ReadOnlySpan<byte> words;
        long first;
        try { words = PageBitmapChunks.Words(payload, pager.Present.WordCount, pager.Memory.PageCount, out first); }
        catch (ProtocolException e) { throw new ProtocolException($"LateZeros (frame {frame} on the page-request connection): {e.Message}"); }
        for (int i = 0; i < words.Length / 8; i++)
            for (ulong bits = System.Buffers.Binary.BinaryPrimitives.ReadUInt64LittleEndian(words[(i * 8)..]); bits != 0; bits &= bits - 1)
            {
                long page = (first + i) * 64 + System.Numerics.BitOperations.TrailingZeroCount(bits);
                if (page >= pager.Memory.PageCount) throw new ProtocolException($"LateZeros (frame {frame} on the page-request connection): page {page} past memory of {pager.Memory.PageCount} pages");
                pager.MarkZero(page);
            }
    }

    /// <summary>Pages a reader decodes back to back before placing them as one run (its scratch holds this many).</summary>
    private const int RunPages = 16;
    private const int ScratchBytes = RunPages * GuestMemory.PageSize;

    /// <summary>
    /// Places every page of one PageBatch not yet present, counting them by encoding in
    /// <paramref name="placed"/>; returns how many it placed. Consecutive pages are decoded
    /// straight into <paramref name="scratch"/> (<see cref="RunPages"/> pages), back to back, and
    /// placed as one run (<see cref="DemandPager.PlaceRun"/>: one UFFDIO_COPY, one copy per page).
    /// </summary>
    private long PlaceBatch(ReadOnlySpan<byte> payload, long frameIndex, byte* scratch, IPageDecoder decoder, EncodingCounters placed)
    {
        var pager = _pager!;
        var entries = new PageBatchEntries(payload, frameIndex, pager.Memory.PageCount);
        var run = new PageRun(scratch);
        long n = 0;
        while (entries.MoveNext(out var entry))
        {
            long page = entry.Page;
            if (pager.Present.IsSet(page)) { Interlocked.Increment(ref _duplicates); continue; }
            if (run.Count > 0 && (page != run.First + run.Count || run.Count == RunPages)) n += Flush(ref run, pager, placed);
            if (entry.Encoding == PageEncoding.Zero && entry.Data.Length == 0)
            {
                n += Flush(ref run, pager, placed);
                if (pager.Place(page, ReadOnlySpan<byte>.Empty)) { placed.Add(entry.Encoding, 0); n++; }
                else Interlocked.Increment(ref _duplicates);
                continue;
            }
            if (run.Count == 0) run.First = page;
            try { decoder.Decode(page, entry.Encoding, entry.Data, run.Next()); }
            catch (ProtocolException bad) { throw entries.AtEntry(entry, bad); }
            run.Add(entry.Encoding, entry.Data.Length);
        }
        return n + Flush(ref run, pager, placed);
    }

    /// <summary>Consecutive decoded pages waiting in a reader's scratch, with what the report counts of each.</summary>
    private struct PageRun(byte* scratch)
    {
        public long First;
        public int Count;
        public readonly byte* Scratch = scratch;
        public EncodingList Encodings;
        public LengthList Lengths;

        public readonly Span<byte> Next() => new(Scratch + Count * GuestMemory.PageSize, GuestMemory.PageSize);

        public void Add(PageEncoding encoding, int length)
        {
            Encodings[Count] = encoding;
            Lengths[Count] = length;
            Count++;
        }
    }

    [System.Runtime.CompilerServices.InlineArray(RunPages)] private struct EncodingList { private PageEncoding _e; }
    [System.Runtime.CompilerServices.InlineArray(RunPages)] private struct LengthList { private int _l; }

    private long Flush(ref PageRun run, DemandPager pager, EncodingCounters placed)
    {
        if (run.Count == 0) return 0;
        ulong mask = pager.PlaceRun(run.First, run.Count, new ReadOnlySpan<byte>(run.Scratch, run.Count * GuestMemory.PageSize));
        int n = 0;
        for (int i = 0; i < run.Count; i++)
        {
            if ((mask & (1UL << i)) == 0) { Interlocked.Increment(ref _duplicates); continue; }
            placed.Add(run.Encodings[i], run.Lengths[i]);
            n++;
        }
        run.Count = 0;
        return n;
    }

    // ---- the session ----------------------------------------------------------------------------

    /// <summary>Runs the migration from PostCopyStart to the end; returns the arrived VM or throws <see cref="MigrationFailedException"/>.</summary>
    public ArrivedVm Run(PostCopyHandover h, ReadOnlySpan<byte> startPayload)
    {
        var memory = h.Memory;
        IVirtualMachine? vm = null;
        var main = new Channel(h.Stream, h.Reader, h.Frames, ChannelKind.Main);
        lock (_lock) _currentMain = main;
        long resumedTs = 0;
        h.Report.Strategy = h.Report.Rounds.Count > 0 ? "hybrid" : "postcopy";
        h.Report.PausedTs = _options.Time.GetTimestamp();
        var downtime = new PhaseClock(_options.Time); // the switch's steps, PostCopyStart → resume (the report's downtimeBreakdown)
        downtime.Start(h.Report.PausedTs);
        long bytesBefore = 0;
        bool readySent = false;
        string? error = null;
        bool? verified = null;
        ulong hash = 0;
        PostCopyEndMessage end = default;
        Span<byte> small = stackalloc byte[128];
        byte* scratch = (byte*)NativeMemory.Alloc(ScratchBytes);
        try
        {
            var start = PostCopyStartMessage.Parse(startPayload);
            if (start.Round != h.CurrentRound + 1) throw new ProtocolException($"PostCopyStart: round {start.Round} after round {h.CurrentRound}");
            (h.Report.StopReason, h.Report.FreePagesSkipped) = (start.Reason, start.FreePagesSkipped);
            using var pending = new NativePageBitmap(memory.PageCount);
            // LateZeros: a switch that announces every page sends no bitmap.
            if (LateZerosOn && start.PendingPages == memory.PageCount)
                for (long w = 0; w < pending.WordCount; w++) pending.SetWord(w, ulong.MaxValue);
            var stateChunks = new VmStateAssembler(_options.MaxVmStateBytes);
            while (true)
            {
                var type = main.Reader.Read(out var payload);
                long frame = main.Reader.FramesRead - 1;
                if (type == FrameType.Error) throw new ProtocolException($"source aborted the migration: {ErrorMessage.Parse(payload).Text}");
                if (type == FrameType.VmState) { if (stateChunks.Add(payload, frame)) break; continue; }
                if (stateChunks.Started) throw stateChunks.Interrupted(type, frame);
                if (type != FrameType.PendingPages) throw new ProtocolException($"unexpected {type} (frame {frame}) after PostCopyStart");
                PageBitmapChunks.Apply(payload, pending);
            }
            byte[] vmState = stateChunks.State;
            h.Report.VmStateBytes = stateChunks.WireBytes;
            downtime.Mark("pending-pages-and-vm-state");
            if (pending.Count() != start.PendingPages) throw new ProtocolException($"PostCopyStart announced {start.PendingPages} pending pages, the bitmap lists {pending.Count()}");
            if (!h.Report.FirstRoundCounted) h.Report.UnsentPages = memory.PageCount - start.PendingPages; // pure post-copy: the source pushes only what is pending

            // Demand paging: present = everything not still to come.
            var present = new NativePageBitmap(memory.PageCount);
            for (long w = 0; w < present.WordCount; w++) present.SetWord(w, ~pending.Word(w));
            lock (_lock)
            {
                _pager = CreatePager(h, present, pending);
                memory.AttachPager(_pager);
                if (_priority is { } ch && !ch.Broken) StartPriorityService(ch);
            }
            downtime.Mark("demand-paging");

            try { vm = h.Factory.Restore(h.Vm, memory, vmState, h.Threads); }
            catch (InvalidDataException e) { throw new ProtocolException(e.Message); }
            downtime.Mark("restore");
            main.Frames.Send(FrameType.Ready, small[..new ReadyMessage(0, 0).Write(small)]);
            readySent = true;
            downtime.Mark("send-ready");
            LimitReceiveBuffer(main);

            // Commit (or, if the connection breaks now, a reconnection: the source only comes back after Commit).
            while (!_resumed)
            {
                try
                {
                    var type = main.Reader.Read(out var payload);
                    if (type == FrameType.Error) throw new SourceAbort($"source aborted the migration: {ErrorMessage.Parse(payload).Text}");
                    if (type != FrameType.Commit || payload.Length != 0) throw new ProtocolException($"expected Commit, got {type}");
                    downtime.Mark("await-commit");
                    Resume(vm, main, ref resumedTs);
                    downtime.Mark("resume");
                    h.Report.DowntimeBreakdown = new DowntimeBreakdown { Destination = downtime.Phases, DestinationJitMs = downtime.JitMs };
                }
                catch (Exception e) when (LinkFailure.Is(e))
                {
                    bytesBefore += main.Reader.BytesRead;
                    main = Recover(main, e, resumeOnAttach: vm, ref resumedTs);
                }
            }

            // Post-copy: pushed pages on main until PostCopyEnd (compressed if negotiated); requested pages on the other connection.
            var pushDecoder = new PushDecoder(h.Placer.Decoder);
            while (true)
            {
                try
                {
                    var type = main.Reader.Read(out var payload);
                    long frame = main.Reader.FramesRead - 1;
                    if (type == FrameType.Error) throw new SourceAbort($"source aborted the migration: {ErrorMessage.Parse(payload).Text}");
                    if (type == FrameType.PageBatch)
                    {
                        Interlocked.Add(ref _placedFromPush, PlaceBatch(payload, frame, scratch, pushDecoder, _pushed));
                        continue;
                    }
                    if (type != FrameType.PostCopyEnd) throw new ProtocolException($"unexpected {type} (frame {frame}) in post-copy");
                    end = PostCopyEndMessage.Parse(payload);
                    // Pushed pages are all here; answers to requests may still be on their way.
                    if (!_pager!.WaitAllPresent(_options.IoTimeout, () => !_priorityBroken && !main.Broken))
                        throw new IOException($"{_pager.Remaining} pages still missing after PostCopyEnd and the page-request connection {(_priorityBroken ? "failed" : "went quiet")}");
                    // Every page is here: the kernel's fault path is no longer needed (holes now fault as zero pages).
                    if (_pager is UffdDemandPager up) up.Stop();
                    hash = _pager.CombineHashes();
                    verified = end.Verify ? hash == end.SourceHash : null;
                    var (p50, p99, max) = _pager.Latency.Summary();
                    var doneMsg = new PostCopyDoneMessage(hash, _pager.Faults, (long)(p50 * 1000), (long)(p99 * 1000), (long)(max * 1000), _networkFaults);
                    _finished = true;
                    // Every page is here and checked: a lost PostCopyDone only costs the source its answer.
                    try { main.Frames.Send(FrameType.PostCopyDone, small[..doneMsg.Write(small)]); }
                    catch (Exception e) when (LinkFailure.Is(e)) { }
                    break;
                }
                catch (Exception e) when (LinkFailure.Is(e) && !_finished)
                {
                    bytesBefore += main.Reader.BytesRead;
                    main = Recover(main, e, resumeOnAttach: null, ref resumedTs);
                }
            }
            if (verified == false) error = $"verification failed: pages as placed hash {hash:x16}, the source's paused memory {end.SourceHash:x16}";
        }
        catch (Exception e) when (e is not MigrationFailedException)
        {
            error = e.Message;
            if (!_resumed)
            {
                // Never ran here: discard, and tell the source (it resumes its own copy).
                if (!readySent || e is SourceAbort || e is RecoveryFailed) { }
                if (e is ProtocolException) TrySendError(main.Frames, ErrorMessage.BadStream, e.Message);
            }
            if (e is VmFailedException) TrySendError(main.Frames, ErrorMessage.BadStream, e.Message); // e.g. the destination QEMU died
        }
        finally
        {
            NativeMemory.Free(scratch);
        }

        // Tear down demand paging: every page is here (or never will be).
        var pager = _pager;
        Finish(error);
        var report = h.Report;
        report.Vm = vm;
        report.ResumedTs = resumedTs;
        report.BytesOnWire += bytesBefore + main.Reader.BytesRead + PriorityBytes(pager);
        RecordPages(report, h.Placer, pager);
        if (verified is not null) (report.Verified, report.DestinationHash, report.SourceHash) = (verified, hash, end.SourceHash);
        var built = report.Build(error);
        if (error is not null)
        {
            if (!_resumed) vm?.Dispose();
            else if (vm is not null) vm.Dispose(); // ran here with pages that can no longer come: its vCPUs stopped at the missing pages
            if (vm is null) { h.Threads?.Dispose(); h.Factory.Discard(h.Vm); memory.Dispose(); }
            throw new MigrationFailedException(error, built);
        }
        return new ArrivedVm(vm!, built);
    }

    /// <summary>What the pages did after the switch, for the report: by encoding (pushed, requested — by the native thread too), counts, faults.</summary>
    private void RecordPages(DestinationReport report, PageBatchReader preCopy, DemandPager? pager)
    {
        report.Pages.Merge(preCopy.Counters);
        report.Pages.Merge(_pushed);
        lock (_requested) report.Pages.Merge(_requested);
        long requested = Interlocked.Read(ref _placedFromRequests);
        if (pager is UffdDemandPager u)
        {
            var (raw, zero, _) = u.NativePlaced; // the native thread decodes raw pages and zero markers only
            report.Pages.Add(PageEncoding.Raw, raw, raw * GuestMemory.PageSize);
            report.Pages.AddPages(PageEncoding.Zero, zero);
            requested += raw + zero;
        }
        if (pager is not null && !report.FirstRoundCounted) report.UnsentPages += pager.LateZeros; // holes at the source's scan, zero after all: never sent
        report.PagesPushed = Interlocked.Read(ref _placedFromPush);
        report.PagesRequested = requested;
        report.PagesPlaced = preCopy.PagesPlaced + report.PagesPushed + requested;
        report.NetworkFaults = _networkFaults;
        report.Faults = pager?.Faults ?? 0;
        var (p50, p99, max) = pager?.Latency.Summary() ?? (0, 0, 0);
        report.FaultLatencyUs = new LatencySummary { P50 = p50, P99 = p99, Max = max };
        report.DemandPaging = pager?.Mode;
    }

    /// <summary>Bytes read off every page-request connection: by the managed readers, and by the native thread.</summary>
    private long PriorityBytes(DemandPager? pager)
    {
        long n = pager is UffdDemandPager u ? u.NativePlaced.BytesRead : 0;
        lock (_priorityChannels) foreach (var ch in _priorityChannels) n += ch.Reader.BytesRead;
        return n;
    }

    /// <summary>A short queue of pushed pages in front of a page a vCPU waits for (PostCopyOptions.PushSocketBuffer).</summary>
    private void LimitReceiveBuffer(Channel main)
    {
        if (_options.PostCopy.PushSocketBuffer <= 0 || main.Stream is not NetworkStream ns) return;
        try { ns.Socket.ReceiveBufferSize = _options.PostCopy.PushSocketBuffer; } catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
    }

    private void Resume(IVirtualMachine vm, Channel main, ref long resumedTs)
    {
        _options.BeforeResume?.Invoke(vm);
        vm.Resume();
        resumedTs = _options.Time.GetTimestamp();
        _resumed = true;
        // The VM runs here now. A lost Resumed only costs the source its acknowledgement.
        try { main.Frames.Send(FrameType.Resumed, []); } catch (Exception e) when (LinkFailure.Is(e)) { }
    }

    private DemandPager CreatePager(PostCopyHandover h, NativePageBitmap present, NativePageBitmap pending)
    {
        var (memory, hashes) = (h.Memory, h.Placer.Hashes);
        // vCPUs of another process (QEMU): its faults, in its mapping, served by the native thread — no portable fallback.
        if (h.Factory.OpenRemoteFaults(h.Vm) is { } remote) { DropPreparation(); return RemotePager(memory, remote, present, pending, hashes); }
        var mode = _options.PostCopy.Mode;
        // Auto = userfaultfd where it can work (docs/reliability.md: why it is safe in a .NET
        // process), else the portable pager with a note.
        if (mode is DemandPagingMode.Userfaultfd or DemandPagingMode.Auto)
        {
            string? why = PriorityProblem();
            var prepared = _prepared;
            _prepared = null; // taken, or disposed below (CreatePager runs under _lock)
            using (prepared)
                if (why is null && UffdDemandPager.TryCreate(memory, present, pending, hashes, _options.PostCopy.CheckAccess, prepared, out var u, out why)) return u!;
            if (mode == DemandPagingMode.Userfaultfd) throw new ProtocolException($"userfaultfd demand paging unavailable: {why}");
            _options.PostCopy.Note?.Invoke($"demand paging: portable (userfaultfd unavailable: {why})");
            Trace?.Invoke($"auto demand paging falls back to portable: {why}");
        }
        return new PortableDemandPager(memory, present, hashes, this);
    }

    /// <summary>Why the native fault thread cannot serve the page-request connection, or null.</summary>
    private string? PriorityProblem()
    {
        // The source sends PostCopyStart only after our Attached, but this side records the
        // connection just after sending Attached: wait for that, or the choice would be a race.
        if (_priority is null) _priorityArrived.Wait(_options.IoTimeout);
        return _priority is null ? "the page-request connection is not attached"
            : UffdDemandPager.CanServe(_priority.Stream) ? null : $"the page-request connection is neither a TCP socket nor TLS records on one ({_priority.Stream.GetType().Name})";
    }

    private UffdDemandPager RemotePager(GuestMemory memory, RemoteFaults remote, NativePageBitmap present, NativePageBitmap pending, PageHashes? hashes)
    {
        string? why = PriorityProblem();
        if (why is not null) Linux.Native.close(remote.Userfaultfd);
        else if (UffdDemandPager.TryCreate(memory, remote, present, pending, hashes, out var pager, out why)) return pager!;
        throw new VmFailedException($"post-copy of this VM needs userfaultfd demand paging of the process that runs it: {why}");
    }

    /// <summary>
    /// After a connection failure: close both connections, keep the faulting vCPUs waiting, wait
    /// for the source to reconnect, tell it which pages are here. Throws <see cref="RecoveryFailed"/> on timeout.
    /// </summary>
    private Channel Recover(Channel broken, Exception cause, IVirtualMachine? resumeOnAttach, ref long resumedTs)
    {
        _networkFaults++;
        Trace?.Invoke($"recover: {cause.GetType().Name}: {cause.Message}");
        broken.Close();
        broken.Released.Set();
        Channel? priority;
        lock (_sendLock) { priority = _priority; _priority = null; _priorityBroken = true; }
        ClosePriority(priority);
        _priorityThread?.Join();
        priority?.Released.Set();
        var window = _options.PostCopy.RecoveryTimeout;
        long deadline = window == Timeout.InfiniteTimeSpan ? long.MaxValue : _options.Time.GetTimestamp() + (long)(window.TotalSeconds * _options.Time.TimestampFrequency);
        _waitingForSource = true;
        try
        {
            return AwaitSource(deadline, cause, resumeOnAttach, ref resumedTs);
        }
        finally { _waitingForSource = false; }
    }

    private volatile bool _waitingForSource;
    private volatile string? _discard;

    /// <summary>The source is gone and this session waits for it (its VM runs with pages missing).</summary>
    public bool WaitingForSource => _waitingForSource;

    /// <summary>An operator's decision to stop waiting for the source and discard the VM; false when the session is not waiting.</summary>
    public bool Discard(string why)
    {
        if (!_waitingForSource) return false;
        _discard = why;
        _mainArrived.Set();
        return true;
    }

    /// <summary>What discarding the VM now loses, in one line.</summary>
    private string Lost() => _pager is { } p
        ? $"the VM ran here with {p.Memory.PageCount - p.Remaining} of its {p.Memory.PageCount} pages; the {p.Remaining} pages that never arrived are lost with it"
        : "the VM had not started here";

    private Channel AwaitSource(long deadline, Exception cause, IVirtualMachine? resumeOnAttach, ref long resumedTs)
    {
        while (true)
        {
            if (_discard is { } why) throw new RecoveryFailed($"post-copy: discarded by the operator while waiting for the source ({why}); {Lost()}");
            Channel? next = null;
            lock (_lock)
            {
                if (_reopenedMain is { } r) { next = r; _reopenedMain = null; _currentMain = r; _mainArrived.Reset(); }
            }
            if (next is not null)
            {
                try
                {
                    if (resumeOnAttach is not null && !_resumed) Resume(resumeOnAttach, next, ref resumedTs); // the source reconnects only after Commit
                    PageBitmapChunks.Send(next.Frames, _pager!.Present);
                    Span<byte> buf = stackalloc byte[8];
                    next.Frames.Send(FrameType.Attached, buf[..new AttachedMessage(ChannelKind.Main, _resumed).Write(buf)]);
                    LimitReceiveBuffer(next);
                    return next;
                }
                catch (Exception e) when (LinkFailure.Is(e))
                {
                    next.Close();
                    next.Released.Set();
                    continue;
                }
            }
            long left = deadline == long.MaxValue ? long.MaxValue : deadline - _options.Time.GetTimestamp();
            if (left <= 0)
                throw new RecoveryFailed($"connection lost in post-copy ({(cause is IOException or SocketException ? LinkFailure.Describe(cause) : cause.InnerException?.Message ?? cause.Message).ReplaceLineEndings(" ")}) and the source did not come back within {_options.PostCopy.RecoveryTimeout.TotalSeconds:0.#} s; the VM is discarded: {Lost()}");
            _mainArrived.Wait(left == long.MaxValue ? TimeSpan.FromSeconds(1) : TimeSpan.FromTicks(Math.Clamp(left * TimeSpan.TicksPerSecond / _options.Time.TimestampFrequency, 1, TimeSpan.TicksPerSecond)));
        }
    }

    /// <summary>Ends demand paging and lets every connection go.</summary>
    private void Finish(string? error)
    {
        _finished = true;
        Unregister();
        DropPreparation();
        var pager = _pager;
        if (pager is not null)
        {
            // On failure the pager stays in force: a vCPU that touches a missing page stops there
            // (PageUnavailableException) instead of running on a page that never came.
            if (error is not null) pager.Abandon(error);
            else pager.Memory.AttachPager(null);
        }
        Channel? p, m, r;
        lock (_sendLock) { p = _priority; _priority = null; }
        lock (_lock) { m = _currentMain; r = _reopenedMain; _reopenedMain = null; }
        if (pager is UffdDemandPager u) u.Stop();
        // The source closes the page-request connection when it has the final answer; do not wait for it.
        ClosePriority(p);
        _priorityThread?.Join();
        p?.Released.Set();
        m?.Released.Set();
        r?.Close();
        r?.Released.Set();
    }

    /// <summary>Closes a page-request connection; with userfaultfd, only once the native thread no longer uses its socket.</summary>
    private void ClosePriority(Channel? ch)
    {
        if (ch is null) return;
        if (_pager is UffdDemandPager u) u.Release(ch.Stream);
        ch.Close();
    }

    private static void TrySendError(FrameWriter frames, ushort code, string text)
    {
        try
        {
            if (frames.IsOpen) frames.Abandon();
            Span<byte> buf = stackalloc byte[4100];
            frames.Send(FrameType.Error, buf[..new ErrorMessage(code, text).Write(buf)]);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or NotSupportedException or SocketException) { }
    }

    private sealed class SourceAbort(string message) : Exception(message);
    private sealed class RecoveryFailed(string message) : Exception(message);
}
