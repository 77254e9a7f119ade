using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using Xunit.Abstractions;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Vm;
using LiveMig.Workloads;

namespace LiveMig.Tests;

public class KvWorkloadTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60); // generous: CI machines are shared and slow

    private static BuiltInVm CreateVm(string workload = "kv:keys=4096", MemoryFill fill = MemoryFill.Zero, string name = "kv") =>
        BuiltInVm.Create(new VmConfig
        {
            Name = name,
            MemoryBytes = 32L << 20,
            Vcpus = 2,
            Workload = workload,
            Seed = 7,
            Fill = fill,
            DirtyLog = DirtyLogKind.Software,
        });

    private static Socket Connect(KvEndpoint endpoint)
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true, ReceiveTimeout = 10_000 };
        s.Connect(endpoint.EndPoint);
        return s;
    }

    /// <summary>One request over a raw socket, speaking the wire format by hand.</summary>
    private static (KvStatus Status, byte[] Value) Call(Socket s, KvOp op, ulong key, ReadOnlySpan<byte> value = default)
    {
        var msg = new byte[KvProtocol.RequestHeaderSize + value.Length];
        KvProtocol.WriteRequestHeader(msg, op, key, value.Length);
        value.CopyTo(msg.AsSpan(KvProtocol.RequestHeaderSize));
        s.Send(msg);
        var head = ReceiveExactly(s, KvProtocol.ResponseHeaderSize);
        int length = BinaryPrimitives.ReadUInt16LittleEndian(head.AsSpan(1));
        return ((KvStatus)head[0], ReceiveExactly(s, length));
    }

    private static byte[] ReceiveExactly(Socket s, int n)
    {
        var buf = new byte[n];
        for (int got = 0; got < n;)
        {
            int r = s.Receive(buf, got, n - got, SocketFlags.None);
            if (r == 0) throw new EndOfStreamException();
            got += r;
        }
        return buf;
    }

    /// <summary>True when the peer closed the connection (EOF or reset) rather than answering.</summary>
    private static bool ClosedByPeer(Socket s)
    {
        var buf = new byte[64];
        try
        {
            while (true)
            {
                if (s.Receive(buf) == 0) return true;
            }
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset) { return true; }
    }

    private static void CopyPages(GuestMemory from, GuestMemory to, long first, long count)
    {
        for (long p = first; p < first + count; p += 1024)
        {
            int n = (int)Math.Min(1024, first + count - p);
            from.Range(p, n).CopyTo(to.Range(p, n));
        }
    }

    private static long CopyDirty(IDirtyLog log, GuestMemory from, GuestMemory to)
    {
        var dirty = new PageBitmap(from.PageCount);
        long n = log.Harvest(dirty);
        for (long p = dirty.NextSet(0); p >= 0; p = dirty.NextSet(p + 1)) CopyPages(from, to, p, 1);
        return n;
    }

    [Fact]
    public async Task Kv_put_and_get_round_trip_through_endpoint_and_client()
    {
        using var vm = CreateVm();
        var kv = Assert.IsType<KvWorkload>(vm.Workload);
        Assert.Null(vm.CheckInvariant()); // a fresh VM has an empty, valid table
        vm.Start();
        using var endpoint = new KvEndpoint();
        endpoint.Attach(kv);

        using (var s = Connect(endpoint))
        {
            Assert.Equal(KvStatus.NotFound, Call(s, KvOp.Get, 42).Status);
            Assert.Equal(KvStatus.Ok, Call(s, KvOp.Put, 42, "hello"u8).Status);
            var (status, value) = Call(s, KvOp.Get, 42);
            Assert.Equal(KvStatus.Ok, status);
            Assert.Equal("hello"u8.ToArray(), value);
            Assert.Equal(KvStatus.Ok, Call(s, KvOp.Put, 42, "hi"u8).Status); // overwrite with a shorter value
            Assert.Equal("hi"u8.ToArray(), Call(s, KvOp.Get, 42).Value);
            Assert.Equal(KvStatus.TooLarge, Call(s, KvOp.Put, 43, new byte[kv.ValueSize + 1]).Status);
            Assert.Equal(KvStatus.Ok, Call(s, KvOp.Put, 0, new byte[kv.ValueSize]).Status); // key 0 and a full-size value are fine
            Assert.Equal(kv.ValueSize, Call(s, KvOp.Get, 0).Value.Length);
        }

        var client = new KvClient(endpoint.EndPoint, new KvClientOptions { Keys = 512, KeyBase = 1000, MaxRequests = 3000, Seed = 11 });
        client.Start();
        await client.Completion.WaitAsync(Bound);
        var stats = await client.StopAsync();
        output.WriteLine(stats.ToString());
        Assert.Equal(3000, stats.Count);
        Assert.Equal(0, stats.Errors);
        Assert.Equal(0, stats.Mismatches);
        Assert.Null(stats.Failure);
        Assert.True(stats.P50Us > 0 && stats.P50Us <= stats.P99Us && stats.P99Us <= stats.MaxUs);

        vm.Pause();
        Assert.Null(vm.CheckInvariant());
        Assert.InRange(kv.Count, 3, 2 + 512); // keys 42 and 0 plus at most the client's key space
        Assert.Equal(3000 + 8, vm.Operations); // every request served, the refused PUT included
    }

    [Fact]
    public async Task Kv_contents_survive_a_migration_and_the_client_sees_only_a_stall()
    {
        using var a = CreateVm(name: "a");
        a.Start();
        using var endpoint = new KvEndpoint();
        endpoint.Attach((KvWorkload)a.Workload);
        var client = new KvClient(endpoint.EndPoint, new KvClientOptions { Keys = 1024, Seed = 5, MinValueLength = 1, MaxValueLength = 256 });
        client.Start();
        try
        {
            Assert.True(await client.WaitForCompletedAsync(2000).WaitAsync(Bound));

            // Pre-copy as the engine will: everything once while running, then the pages the log saw written.
            using var destination = GuestMemory.Create(a.Memory.Size, "livemig-kv-b");
            a.DirtyLog.Start();
            foreach (var (first, count) in a.Memory.DataExtents()) CopyPages(a.Memory, destination, first, count);
            Assert.True(await client.WaitForCompletedAsync(client.Completed + 1000).WaitAsync(Bound));
            CopyDirty(a.DirtyLog, a.Memory, destination);
            Assert.True(await client.WaitForCompletedAsync(client.Completed + 1000).WaitAsync(Bound));

            a.Pause();
            // The client's next request now waits in A's queue: from here until B runs nothing is served.
            Assert.True(SpinWait.SpinUntil(() => ((KvWorkload)a.Workload).QueuedRequests > 0, Bound));
            long stalledSince = Stopwatch.GetTimestamp();
            long beforeResume = client.Completed;
            CopyDirty(a.DirtyLog, a.Memory, destination);
            Assert.Equal(a.Memory.ComputeHash(), destination.ComputeHash()); // the dirty log missed no write
            byte[] state = a.SaveState();

            using var b = BuiltInVm.Restore(destination, state, DirtyLogKind.Software);
            var kvB = (KvWorkload)b.Workload;
            Assert.Equal(((KvWorkload)a.Workload).TableId, kvB.TableId);
            Assert.Null(b.CheckInvariant());
            endpoint.Attach(kvB); // moves the waiting request to B
            Assert.Equal(0, ((KvWorkload)a.Workload).QueuedRequests);
            a.Stop();
            Assert.Equal(beforeResume, client.Completed); // nothing was served while no VM ran
            long resumed = Stopwatch.GetTimestamp();
            b.Resume();

            Assert.True(await client.WaitForCompletedAsync(client.Completed + 3000).WaitAsync(Bound));
            var stats = await client.StopAsync();
            output.WriteLine($"all: {stats}");
            output.WriteLine($"stall: {(resumed - stalledSince) * 1e6 / Stopwatch.Frequency:F0} us");
            Assert.Null(stats.Failure);
            Assert.Equal(0, stats.Errors);
            Assert.Equal(0, stats.Mismatches);
            Assert.True(stats.Count >= beforeResume + 3000);
            // The request that waited across the move took at least the whole stall, and so did the gap between replies.
            double stallUs = (resumed - stalledSince) * 1e6 / Stopwatch.Frequency;
            Assert.True(stats.MaxUs >= stallUs, $"max latency {stats.MaxUs} us < stall {stallUs} us");
            Assert.True(stats.LongestGapUs >= stallUs, $"longest gap {stats.LongestGapUs} us < stall {stallUs} us");
            var after = client.GetStats(from: resumed);
            output.WriteLine($"before: {client.GetStats(to: stalledSince)}");
            output.WriteLine($"after: {after}");
            Assert.True(after.Count >= 3000);
            Assert.Equal(0, after.Mismatches);

            b.Pause();
            Assert.Null(b.CheckInvariant());
            Assert.True(b.Operations > a.Operations); // B's counters continued from A's
        }
        finally
        {
            client.Dispose();
        }
    }

    [Fact]
    public async Task Kv_endpoint_closes_connections_that_send_bad_input_and_keeps_serving()
    {
        using var vm = CreateVm();
        vm.Start();
        using var endpoint = new KvEndpoint();
        endpoint.Attach((KvWorkload)vm.Workload);

        byte[][] bad =
        [
            [0x7F, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], // unknown op
            [(byte)KvOp.Put, 1, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF], // value length 65535: more than any slot
            [(byte)KvOp.Get, 1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 1, 2, 3, 4, 5], // GET carries no value
        ];
        using var good = Connect(endpoint);
        Assert.Equal(KvStatus.Ok, Call(good, KvOp.Put, 9, "nine"u8).Status);
        foreach (byte[] garbage in bad)
        {
            using var s = Connect(endpoint);
            s.Send(garbage);
            Assert.True(ClosedByPeer(s));
        }
        using (var half = Connect(endpoint)) half.Send(new byte[] { (byte)KvOp.Put, 1, 2 }); // hangs up mid-header

        Assert.Equal(3, endpoint.Rejected);
        // The connection opened before the bad ones still works, and so do new ones.
        Assert.Equal("nine"u8.ToArray(), Call(good, KvOp.Get, 9).Value);
        var client = new KvClient(endpoint.EndPoint, new KvClientOptions { Keys = 64, MaxRequests = 500, Seed = 3 });
        client.Start();
        await client.Completion.WaitAsync(Bound);
        var stats = await client.StopAsync();
        Assert.Equal(500, stats.Count);
        Assert.Equal(0, stats.Errors + stats.Mismatches);
    }

    [Fact]
    public void Kv_requests_wait_while_no_vm_is_attached_and_time_out_as_unavailable()
    {
        using var vm = CreateVm();
        vm.Start();
        using var endpoint = new KvEndpoint(requestTimeout: TimeSpan.FromMilliseconds(200));
        using var s = Connect(endpoint);
        // Nothing attached: the request is held, then refused as not applied.
        Assert.Equal(KvStatus.Unavailable, Call(s, KvOp.Put, 1, "x"u8).Status);
        Assert.Equal(1, endpoint.TimedOut);

        // Held requests are delivered once a VM takes the address.
        using var endpoint2 = new KvEndpoint();
        using var s2 = Connect(endpoint2);
        var msg = new byte[KvProtocol.RequestHeaderSize + 1];
        KvProtocol.WriteRequestHeader(msg, KvOp.Put, 2, 1);
        s2.Send(msg);
        endpoint2.Attach((KvWorkload)vm.Workload);
        Assert.Equal(KvStatus.Ok, (KvStatus)ReceiveExactly(s2, 3)[0]);
        Assert.Equal(KvStatus.NotFound, Call(s2, KvOp.Get, 1).Status); // the timed-out PUT was never applied
    }

    [Fact]
    public void Kv_table_initialises_over_filled_memory_and_restore_refuses_memory_without_it()
    {
        using var vm = CreateVm("kv:keys=2000,value=100", MemoryFill.Random);
        Assert.Null(vm.CheckInvariant());
        var kv = (KvWorkload)vm.Workload;
        var r = new KvRequest();
        vm.Start();
        for (ulong k = 0; k < 2000; k++)
        {
            r.Prepare(KvOp.Put, k * 7919, BitConverter.GetBytes(k));
            kv.Submit(r);
            Assert.True(r.Wait(Bound));
            Assert.Equal(KvStatus.Ok, r.Status);
        }
        r.Prepare(KvOp.Put, 1, "one more"u8);
        kv.Submit(r);
        Assert.True(r.Wait(Bound));
        Assert.Equal(KvStatus.Full, r.Status);
        vm.Pause();
        Assert.Equal(2000, kv.Count);
        Assert.Null(vm.CheckInvariant());
        byte[] state = vm.SaveState();

        // A destination whose pages never arrived has no table: refuse rather than start an empty store.
        var empty = GuestMemory.Create(vm.Memory.Size);
        try { Assert.Throws<InvalidDataException>(() => BuiltInVm.Restore(empty, state, DirtyLogKind.Software)); }
        finally { empty.Dispose(); }

        using (var high = CreateVm("kv:keys=1000,at=50%"))
        {
            var kvHigh = (KvWorkload)high.Workload;
            Assert.Equal(high.Memory.PageCount / 2, kvHigh.FirstPage);
            Assert.Equal([(kvHigh.FirstPage, 1L)], high.Memory.DataExtents()); // only the header page is written; the slots stay holes
            Assert.Null(high.CheckInvariant());
        }
        using (var low = CreateVm("kv:at=0")) Assert.Equal(0, ((KvWorkload)low.Workload).FirstPage);

        Assert.Throws<FormatException>(() => CreateVm("kv:keys=100000000"));
        Assert.Throws<FormatException>(() => CreateVm("kv:keys=1000,at=100%")); // no room after the start
        Assert.Throws<FormatException>(() => CreateVm("kv:value=5000"));
        Assert.Throws<FormatException>(() => CreateVm("kv:size=1"));
    }
}

public class KvFreePageHintTests
{
    [Fact]
    public void Kv_reports_everything_outside_its_table_as_free()
    {
        using var vm = LiveMig.Vm.BuiltInVm.Create(new LiveMig.Vm.VmConfig { MemoryBytes = 16L << 20, Workload = "kv:keys=1000,at=25%" });
        var kv = (LiveMig.Workloads.KvWorkload)vm.Workload;
        var free = new LiveMig.Memory.PageBitmap(vm.Memory.PageCount);
        long n = kv.FreePages(free);
        Assert.Equal(vm.Memory.PageCount - kv.TablePages, n);
        Assert.Equal(n, free.Count());
        for (long p = kv.FirstPage; p < kv.FirstPage + kv.TablePages; p++) Assert.False(free.IsSet(p));
        Assert.True(free.IsSet(0) && free.IsSet(vm.Memory.PageCount - 1));
    }
}
