using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using LiveMig.Linux;
using LiveMig.Transport;
using static LiveMig.Linux.Userfaultfd;

namespace LiveMig.Memory;

/// <summary>
/// Demand paging with the kernel's help: the guest mapping is registered with userfaultfd in
/// MISSING mode, so any access to a page that has not arrived — through the vCPU access path or
/// a raw pointer anywhere — faults, and the fault is resolved by the native helper
/// (native/uffd_serve.c) on its own pthread: it reads the fault, sends the page request on the
/// page-request connection (whose socket it owns while attached), receives the page and places
/// it with UFFDIO_COPY (UFFDIO_ZEROPAGE for zero pages). No managed code of this process is on
/// that path — the source answers every request on that connection, also for a page whose push
/// is still on its way (that push reaches us through the managed main-connection reader, which a
/// collection can stop: the deadlock found in docs/reliability.md) — so a garbage collection
/// never waits for a faulting thread forever (shared/field-notes.md). Pushed pages are placed
/// from managed code with UFFDIO_COPY too (that thread never faults); the kernel arbitrates
/// between the two (EEXIST: already there).
/// With <c>checkAccess</c> the vCPU access path also looks at the present bitmap and takes a
/// missing page through madvise(MADV_POPULATE_WRITE): the fault then happens inside a system
/// call, where the thread is preemptive, so even while the connection is down (faults pending
/// for a long time, and the new connection is attached by managed code) a collection never
/// waits for a vCPU. Raw faults (any other access, or <c>checkAccess</c> off) need a source in
/// another process: a source in this process answers from managed threads.
/// <para>
/// For a VM whose vCPUs are another process's (QEMU) the userfaultfd is that process's
/// (<see cref="RemoteFaults"/>): its faults are served the same way, by address in its mapping;
/// this process's own mapping is never touched for a missing page. Abandoning does not release
/// its faulting threads onto zero pages: they wait until that process is ended.
/// </para>
/// </summary>
public sealed unsafe class UffdDemandPager : DemandPager
{
    private const string Lib = "livemig_uffd";
    private const int LatencyCapacity = 1 << 20;
    private const ulong UFFD_FEATURE_MISSING_SHMEM = 1UL << 5;
    private const ulong UFFDIO_COPY = 0xC028AA03, UFFDIO_ZEROPAGE = 0xC020AA04;
    private const int EFD_CLOEXEC = 0x80000;
    private const int ESRCH = 3;

    [StructLayout(LayoutKind.Sequential)]
    private struct UffdioCopy { public ulong Dst, Src, Len, Mode; public long Copy; }

    [StructLayout(LayoutKind.Sequential)]
    private struct UffdioZeropage { public UffdioRange Range; public ulong Mode; public long Zeropage; }

    /// <summary>Mirrors lm_uffd_ctx in native/uffd_serve.c.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct Ctx
    {
        public long Uffd, Ctl, Notify;
        public ulong Base, PageCount;
        public ulong* Present;
        public ulong* Hashes;
        public long* LatNs;
        public ulong LatCap;
        public long NextSock;
        public ulong SockGen, SockAck;
        public long Stop, Abandon;
        public long Sock;
        public ulong LatCount, Faults, ZeroFaults, Requests, Placed, Eexist, FramesIn, Dropped, Errors;
        public ulong PlacedZero, BytesIn;
        public ulong Thread;
        public fixed byte Error[256];
        public fixed byte Why[256];
        public long NextAead;
        public ulong NextSendSeq, NextRecvSeq;
        public fixed byte NextSendKey[32];
        public fixed byte NextRecvKey[32];
        public fixed byte NextSendIv[16];
        public fixed byte NextRecvIv[16];
        public ulong LateZero;
    }

    [DllImport(Lib)] private static extern int lm_uffd_start(Ctx* c);
    [DllImport(Lib)] private static extern void lm_uffd_set_socket(Ctx* c, long sock);
    [DllImport(Lib)] private static extern void lm_uffd_release_socket(Ctx* c, long sock);
    [DllImport(Lib)] private static extern void lm_uffd_abandon(Ctx* c);
    [DllImport(Lib)] private static extern int lm_uffd_wait(Ctx* c, int timeoutMs);
    [DllImport(Lib)] private static extern void lm_uffd_stop(Ctx* c);
    [DllImport(Lib)] private static extern long lm_uffd_ctx_size();
    [DllImport("libc", SetLastError = true)] private static extern int eventfd(uint initval, int flags);

    [ThreadStatic] private static byte* t_bounce;

    private Ctx* _ctx;
    private readonly bool _checkAccess;
    /// <summary>Where the registered range starts in the address space the userfaultfd carries: this process's mapping, or the remote owner's.</summary>
    private readonly ulong _base;
    private readonly RemoteFaults? _remote;
    private readonly Thread _watcher;
    private volatile bool _stopped;
    private Action? _onBroken;
    private readonly Lock _connLock = new();

    private UffdDemandPager(GuestMemory memory, NativePageBitmap present, PageHashes? hashes, bool checkAccess, Ctx* ctx, RemoteFaults? remote = null)
        : base(memory, present, hashes)
    {
        _remote = remote;
        _checkAccess = checkAccess && remote is null;
        _base = ctx->Base;
        _ctx = ctx;
        // The native thread reads these only for a fault, and a fault comes only after the range is registered.
        _ctx->Present = present.Words;
        _ctx->Hashes = Hashes;
        _watcher = new Thread(Watch) { IsBackground = true, Name = "livemig-uffd-watch" };
        _watcher.Start();
    }

    /// <summary>
    /// The native thread's context over <paramref name="uffd"/> (owned from here on: closed if
    /// this fails), with the thread running and waiting: nothing in it depends on which pages are
    /// present, so it can be made before the pause.
    /// </summary>
    private static Ctx* StartContext(int uffd, ulong baseAddress, long pageCount)
    {
        var c = (Ctx*)NativeMemory.AllocZeroed((nuint)sizeof(Ctx));
        c->Uffd = uffd;
        c->Ctl = eventfd(0, EFD_CLOEXEC);
        c->Notify = eventfd(0, EFD_CLOEXEC);
        c->Base = baseAddress;
        c->PageCount = (ulong)pageCount;
        c->LatNs = (long*)NativeMemory.Alloc(LatencyCapacity * sizeof(long));
        c->LatCap = LatencyCapacity;
        c->NextSock = -1;
        c->Sock = -1;
        string? failed = c->Ctl < 0 || c->Notify < 0 ? $"eventfd failed: {Native.ErrorText(Marshal.GetLastPInvokeError())}" : null;
        int r = failed is null ? lm_uffd_start(c) : 0;
        if (r != 0) failed = $"cannot start the fault-service thread: {Native.ErrorText(-r)}";
        if (failed is null) return c;
        FreeContext(c, threadStarted: false);
        throw new IOException(failed);
    }

    private static void FreeContext(Ctx* c, bool threadStarted)
    {
        if (threadStarted) lm_uffd_stop(c);
        Native.close((int)c->Uffd);
        if (c->Ctl >= 0) Native.close((int)c->Ctl);
        if (c->Notify >= 0) Native.close((int)c->Notify);
        NativeMemory.Free(c->LatNs);
        NativeMemory.Free(c);
    }

    /// <summary>
    /// What a pager of this process's own mapping needs that does not depend on the pages — the
    /// userfaultfd (API agreed, nothing registered yet), the native thread and its context —
    /// made before the pause (<see cref="Prepare"/>), so that the switch only punches, registers
    /// and starts watching: made in the switch these cost 2–6 ms of downtime here (the thread
    /// start, the buffers, and on first use the native library's load).
    /// </summary>
    public sealed class Preparation : IDisposable
    {
        private nint _ctx; // a Ctx*, owned until taken
        internal Preparation(nint ctx) => _ctx = ctx;
        internal nint Take() => Interlocked.Exchange(ref _ctx, 0);

        /// <summary>Stops the thread and closes the descriptor, unless a pager took them.</summary>
        public void Dispose()
        {
            nint c = Take();
            if (c != 0) FreeContext((Ctx*)c, threadStarted: true);
        }
    }

    /// <summary>Makes a <see cref="Preparation"/> for <paramref name="memory"/>, or says why it cannot (then the switch will fall back as it would have).</summary>
    public static Preparation? Prepare(GuestMemory memory, out string? why)
    {
        int fd = OpenLocal(out why);
        if (fd < 0) return null;
        try { return new Preparation((nint)StartContext(fd, (ulong)memory.Base, memory.PageCount)); }
        catch (IOException e) { why = e.Message; return null; }
    }

    /// <summary>A userfaultfd for this process, with the API (shared-memory MISSING faults) agreed; -1 and why when it cannot be had.</summary>
    private static int OpenLocal(out string? why)
    {
        why = LibraryProblem.Value;
        if (why is not null) return -1;
        // Not UFFD_USER_MODE_ONLY: the access path's madvise faults from the kernel.
        int fd = (int)Native.syscall(Native.SYS_userfaultfd, Native.O_CLOEXEC | Native.O_NONBLOCK);
        if (fd < 0) { why = $"userfaultfd: {Native.ErrorText(Native.Errno)} (needs root or vm.unprivileged_userfaultfd=1)"; return -1; }
        var api = new UffdioApi { Api = UFFD_API, Features = UFFD_FEATURE_MISSING_SHMEM };
        if (Native.ioctl(fd, UFFDIO_API, &api) == 0) return fd;
        why = $"UFFDIO_API (MISSING_SHMEM): {Native.ErrorText(Native.Errno)}";
        Native.close(fd);
        return -1;
    }

    /// <summary>Loads the native helper now (a few milliseconds on first use), so that no switch pays for it.</summary>
    public static void LoadLibrary() => _ = LibraryProblem.Value;

    public override string Mode => _remote is null ? "userfaultfd" : "userfaultfd-remote";

    public override long Remaining => base.Remaining - (long)Volatile.Read(ref _ctx->Placed);

    /// <summary>Requested pages the native thread placed (raw pages and zero markers), and the bytes it read off page-request connections.</summary>
    public (long Raw, long Zero, long BytesRead) NativePlaced
    {
        get
        {
            Ctx* c = _ctx;
            if (c == null) return (0, 0, 0); // disposed
            long zero = (long)Volatile.Read(ref c->PlacedZero), late = (long)Volatile.Read(ref c->LateZero);
            return ((long)Volatile.Read(ref c->Placed) - zero - late, zero, (long)Volatile.Read(ref c->BytesIn));
        }
    }

    public override long LateZeros => _ctx == null ? 0 : (long)Volatile.Read(ref _ctx->LateZero);

    /// <summary>Why the native thread last dropped its connection.</summary>
    public string? DropReason => Marshal.PtrToStringUTF8((nint)_ctx->Why);

    /// <summary>Faults the native thread saw, requests it sent, pages it placed, faults on zero pages it filled itself.</summary>
    public (long Faults, long Requests, long Placed, long ZeroFaults, long Dropped, string? Error) NativeCounters =>
        ((long)_ctx->Faults, (long)_ctx->Requests, (long)_ctx->Placed, (long)_ctx->ZeroFaults, (long)_ctx->Dropped,
         _ctx->Errors == 0 ? null : Marshal.PtrToStringUTF8((nint)_ctx->Error));

    private static readonly Lazy<string?> LibraryProblem = new(() =>
    {
        if (!OperatingSystem.IsLinux()) return "not Linux";
        string path = Path.Combine(AppContext.BaseDirectory, "liblivemig_uffd.so");
        if (!NativeLibrary.TryLoad(path, out _)) return $"native helper {path} is missing (it is built with gcc and libxxhash0: scripts/install-deps.sh)";
        try { return lm_uffd_ctx_size() == sizeof(Ctx) ? null : "native helper has a different layout than this build"; }
        catch (DllNotFoundException e) { return e.Message; }
    });

    /// <summary>
    /// Registers <paramref name="memory"/> with userfaultfd (MISSING) after discarding the stale
    /// content of the pages still to come, and starts the native fault-service thread (no
    /// connection yet: <see cref="ServeConnection"/>).
    /// </summary>
    public static bool TryCreate(GuestMemory memory, NativePageBitmap present, NativePageBitmap pending, PageHashes? hashes, bool checkAccess, out UffdDemandPager? pager, out string? why) =>
        TryCreate(memory, present, pending, hashes, checkAccess, null, out pager, out why);

    /// <summary>As above, with the thread and descriptor of <paramref name="prepared"/> if given (taken: the preparation is empty afterwards).</summary>
    public static bool TryCreate(GuestMemory memory, NativePageBitmap present, NativePageBitmap pending, PageHashes? hashes, bool checkAccess, Preparation? prepared,
        out UffdDemandPager? pager, out string? why)
    {
        pager = null;
        why = null;
        Ctx* ctx = prepared is null ? null : (Ctx*)prepared.Take();
        if (ctx == null)
        {
            int fd = OpenLocal(out why);
            if (fd < 0) return false;
            try { ctx = StartContext(fd, (ulong)memory.Base, memory.PageCount); }
            catch (IOException e) { why = e.Message; return false; }
        }
        if (PunchPending(memory, pending) is { } failed) { FreeContext(ctx, threadStarted: true); why = failed; return false; }
        // The thread may see a fault as soon as the range is registered: it has the bitmaps first.
        ctx->Present = present.Words;
        ctx->Hashes = hashes is null ? null : hashes.Pointer;
        var reg = new UffdioRegister { Range = new UffdioRange { Start = (ulong)memory.Base, Len = (ulong)memory.Size }, Mode = UFFDIO_REGISTER_MODE_MISSING };
        if (Native.ioctl((int)ctx->Uffd, UFFDIO_REGISTER, &reg) != 0) why = $"UFFDIO_REGISTER(MISSING): {Native.ErrorText(Native.Errno)}";
        else if ((reg.Ioctls & ((1UL << 3) | (1UL << 4))) != ((1UL << 3) | (1UL << 4))) why = "this kernel offers no UFFDIO_COPY/UFFDIO_ZEROPAGE on shared memory"; // _UFFDIO_COPY, _UFFDIO_ZEROPAGE
        if (why is not null)
        {
            FreeContext(ctx, threadStarted: true); // closing the descriptor ends any registration
            return false;
        }
        pager = new UffdDemandPager(memory, present, hashes, checkAccess, ctx);
        return true;
    }

    /// <summary>Pages still to come may hold an older copy (hybrid): make them holes, so that they fault.</summary>
    private static string? PunchPending(GuestMemory memory, NativePageBitmap pending)
    {
        foreach (var (first, count) in memory.DataExtents())
        {
            for (long p = pending.NextSet(first); p >= 0 && p < first + count;)
            {
                long end = p;
                while (end + 1 < first + count && pending.IsSet(end + 1)) end++;
                if (memory.PunchHole(p, end - p + 1) is { } failed) return failed;
                p = pending.NextSet(end + 1);
            }
        }
        return null;
    }

    /// <summary>
    /// Demand paging over another process's faults (<see cref="RemoteFaults"/>, registered there
    /// in MISSING mode): the pages still to come become holes of the shared file (so that they
    /// fault in that process's mapping too), and the native thread starts. The pager owns the
    /// descriptor from here on, also when this fails (it is closed).
    /// </summary>
    public static bool TryCreate(GuestMemory memory, RemoteFaults remote, NativePageBitmap present, NativePageBitmap pending, PageHashes? hashes, out UffdDemandPager? pager, out string? why)
    {
        pager = null;
        why = LibraryProblem.Value ?? (remote.Length != memory.Size ? $"the registered range is {remote.Length} bytes, the guest memory {memory.Size}" : null)
            ?? PunchPending(memory, pending);
        if (why is not null) { Native.close(remote.Userfaultfd); return false; }
        Ctx* ctx;
        try { ctx = StartContext(remote.Userfaultfd, remote.Address, memory.PageCount); } // closes the descriptor if it fails
        catch (IOException e) { why = e.Message; return false; }
        pager = new UffdDemandPager(memory, present, hashes, checkAccess: false, ctx, remote);
        return true;
    }

    /// <summary>Whether the native thread can serve <paramref name="stream"/>: a plain TCP socket, or TLS records (<see cref="AeadStream"/>) on one.</summary>
    public static bool CanServe(Stream stream) => SocketOf(stream) is not null;

    private static NetworkStream? SocketOf(Stream stream) => Connection(stream) switch
    {
        NetworkStream ns => ns,
        AeadStream { Inner: NetworkStream ns } => ns,
        _ => null,
    };

    /// <summary>The stream itself, or, past the listener's look at its first bytes (once they are read again), the connection under it.</summary>
    private static Stream Connection(Stream stream) => stream is ReplayStream { Drained: true } r ? Connection(r.Connection) : stream;

    /// <summary>
    /// Gives the native thread the page-request connection; <paramref name="onBroken"/> runs (on a
    /// managed thread) if it fails. A TLS connection's record layer goes with it (keys and sequence
    /// numbers, <see cref="AeadStream.Lend"/>): from then on only the native thread reads and writes it.
    /// </summary>
    public void ServeConnection(Stream stream, Action onBroken)
    {
        var ns = SocketOf(stream) ?? throw new ArgumentException("userfaultfd demand paging needs a TCP socket, plain or with LiveMig's TLS records", nameof(stream));
        lock (_connLock)
        {
            Volatile.Write(ref _onBroken, onBroken);
            // Written before the hand-over, which the native thread reads under its lock; no hand-over is pending now (each waits for its acknowledgement).
            if (Connection(stream) is AeadStream tls) SetRecordLayer(tls.Lend().State);
            else _ctx->NextAead = 0;
            lm_uffd_set_socket(_ctx, (long)ns.Socket.Handle);
        }
    }

    private void SetRecordLayer(AeadStream.RecordState s)
    {
        Ctx* c = _ctx;
        c->NextAead = 1;
        c->NextSendSeq = s.SendSeq;
        c->NextRecvSeq = s.ReceiveSeq;
        s.SendKey.CopyTo(new Span<byte>(c->NextSendKey, 32));
        s.ReceiveKey.CopyTo(new Span<byte>(c->NextRecvKey, 32));
        s.SendIv.CopyTo(new Span<byte>(c->NextSendIv, 16));
        s.ReceiveIv.CopyTo(new Span<byte>(c->NextRecvIv, 16));
    }

    /// <summary>Makes the native thread stop using <paramref name="stream"/>'s socket, if it does; then the stream may be closed.</summary>
    public void Release(Stream stream)
    {
        if (SocketOf(stream) is not { } ns || _stopped) return;
        nint fd;
        try { fd = ns.Socket.Handle; } catch (ObjectDisposedException) { return; }
        lock (_connLock) lm_uffd_release_socket(_ctx, fd);
    }

    private void Watch()
    {
        while (!_stopped)
        {
            if (lm_uffd_wait(_ctx, 500) == 0) continue;
            if (Volatile.Read(ref _ctx->Sock) < 0) Interlocked.Exchange(ref _onBroken, null)?.Invoke();
        }
    }

    public override void Fault(long page)
    {
        // The faulting threads are another process's: nothing here touches a missing page (it would read a zero page), it can only wait.
        if (_remote is not null) { WaitPlaced(page); return; }
        // Raw mode: the access itself faults and the kernel blocks it until the native thread places the page.
        if (!_checkAccess) return;
        long t0 = Stopwatch.GetTimestamp();
        nint addr = (nint)(Memory.Base + (page << GuestMemory.PageShift));
        var spin = new SpinWait();
        while (!Present.IsSet(page))
        {
            if (IsAbandoned) throw new PageUnavailableException($"guest page {page} cannot arrive: the migration was abandoned");
            // The fault is taken inside this call (preemptive: a GC does not wait for it) and resolved by the native thread.
            if (Native.madvise(addr, GuestMemory.PageSize, Native.MADV_POPULATE_WRITE) != 0)
            {
                int e = Native.Errno;
                if (e is not (Native.EINTR or Native.EAGAIN)) throw new IOException($"madvise(POPULATE_WRITE) of guest page {page}: {Native.ErrorText(e)}");
                continue;
            }
            // Mapped now. If the bit is not set yet, the pusher is between its copy and the bit (or we were abandoned).
            spin.SpinOnce(sleep1Threshold: -1);
        }
        Latency.Record(Stopwatch.GetTimestamp() - t0);
    }

    /// <summary>Waits (preemptively) until the page is placed, by either placer; native placements pulse nothing, so it polls.</summary>
    private void WaitPlaced(long page)
    {
        var spin = new SpinWait();
        while (!Present.IsSet(page))
        {
            if (IsAbandoned) throw new PageUnavailableException($"guest page {page} cannot arrive: the migration was abandoned");
            spin.SpinOnce();
        }
    }

    /// <summary>A placement failed: the remote owner's address space is gone (ESRCH) — the VM failed, not the link — or another error.</summary>
    private Exception PlaceFailed(string what, int errno)
    {
        if (_remote is not null && errno == ESRCH)
            return new Vm.VmFailedException(_remote.OwnerGone() ?? "the process that runs the VM has ended (its address space is gone)");
        return new IOException($"{what}: {Native.ErrorText(errno)}");
    }

    public override bool Place(long page, ReadOnlySpan<byte> content)
    {
        if (Present.IsSet(page)) return false;
        ulong dst = _base + ((ulong)page << GuestMemory.PageShift);
        while (true)
        {
            int r;
            if (content.IsEmpty)
            {
                var z = new UffdioZeropage { Range = new UffdioRange { Start = dst, Len = GuestMemory.PageSize } };
                r = Native.ioctl((int)_ctx->Uffd, UFFDIO_ZEROPAGE, &z);
            }
            else
            {
                byte* bounce = t_bounce;
                if (bounce == null) t_bounce = bounce = (byte*)NativeMemory.AlignedAlloc(GuestMemory.PageSize, GuestMemory.PageSize);
                content.CopyTo(new Span<byte>(bounce, GuestMemory.PageSize));
                var c = new UffdioCopy { Dst = dst, Src = (ulong)bounce, Len = GuestMemory.PageSize };
                r = Native.ioctl((int)_ctx->Uffd, UFFDIO_COPY, &c);
            }
            if (r == 0) break;
            int e = Native.Errno;
            if (e == Native.EEXIST) return false; // the native thread placed it first
            if (e is Native.EAGAIN or Native.EINTR) continue;
            throw PlaceFailed($"placing guest page {page} (UFFDIO_{(content.IsEmpty ? "ZEROPAGE" : "COPY")})", e);
        }
        RecordHash(page, content);
        Present.Set(page);
        OnPlaced(1);
        return true;
    }

    /// <summary>
    /// One <c>UFFDIO_COPY</c> for the whole run, straight from <paramref name="contents"/> (no
    /// bounce copy): the kernel copies until a page is there already (the native thread placed
    /// it: that page is skipped) and the rest is copied by the next call.
    /// </summary>
    public override ulong PlaceRun(long first, int count, ReadOnlySpan<byte> contents)
    {
        if (count > MaxRunPages || contents.Length < count * GuestMemory.PageSize) throw new ArgumentOutOfRangeException(nameof(count));
        ulong placed = 0;
        fixed (byte* src = contents)
        {
            int at = 0;
            while (at < count)
            {
                if (Present.IsSet(first + at)) { at++; continue; }
                ulong dst = _base + ((ulong)(first + at) << GuestMemory.PageShift);
                var c = new UffdioCopy { Dst = dst, Src = (ulong)(src + at * GuestMemory.PageSize), Len = (ulong)((count - at) * GuestMemory.PageSize) };
                int r = Native.ioctl((int)_ctx->Uffd, UFFDIO_COPY, &c);
                int e = r == 0 ? 0 : Native.Errno;
                // Copied: all of it (r == 0), or a prefix before a page that is there already (EAGAIN with copy > 0).
                int done = r == 0 ? count - at : c.Copy > 0 ? (int)(c.Copy / GuestMemory.PageSize) : 0;
                for (int i = at; i < at + done; i++)
                {
                    RecordHash(first + i, contents.Slice(i * GuestMemory.PageSize, GuestMemory.PageSize));
                    Present.Set(first + i);
                    placed |= 1UL << i;
                }
                if (done > 0) OnPlaced(done);
                at += done;
                if (r == 0 || done > 0) continue;
                if (e == Native.EEXIST) { at++; continue; } // the native thread placed this one first
                if (e is Native.EAGAIN or Native.EINTR) continue;
                throw PlaceFailed($"placing guest pages {first + at}..{first + count - 1} (UFFDIO_COPY)", e);
            }
        }
        return placed;
    }

    public override void Abandon(string why)
    {
        base.Abandon(why);
        // Another process's threads are not released onto zero pages: they wait until it is ended.
        if (!_stopped && _remote is null) lm_uffd_abandon(_ctx);
    }

    /// <summary>Stops the native thread, adds its latencies, unregisters the memory (from now on holes fault as zero pages).</summary>
    public void Stop()
    {
        if (_stopped) return;
        _stopped = true;
        lm_uffd_stop(_ctx);
        _watcher.Join();
        // With the access check every fault on a missing page was timed already, around its madvise.
        int n = (int)Math.Min(_ctx->LatCount, _ctx->LatCap);
        if (!_checkAccess) Latency.RecordNanoseconds(new ReadOnlySpan<long>(_ctx->LatNs, n));
        if (_remote is not null && IsAbandoned)
        {
            // Its threads must not run on with pages that never came: the registration stays (the
            // owner's copy of the descriptor holds it) until the owner is ended.
            Native.close((int)_ctx->Uffd);
            return;
        }
        var range = new UffdioRange { Start = _base, Len = (ulong)Memory.Size };
        Native.ioctl((int)_ctx->Uffd, UFFDIO_UNREGISTER, &range);
        Native.close((int)_ctx->Uffd);
        _remote?.Release();
    }

    protected override void Dispose(bool disposing)
    {
        Stop();
        Ctx* c = _ctx;
        _ctx = null;
        if (c != null)
        {
            Native.close((int)c->Ctl);
            Native.close((int)c->Notify);
            NativeMemory.Free(c->LatNs);
            NativeMemory.Free(c);
        }
        base.Dispose(disposing);
    }
}
