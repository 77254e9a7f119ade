using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using LiveMig.DirtyTracking;
using LiveMig.Memory;
using LiveMig.Protocol;
using LiveMig.Qemu;

namespace LiveMig.Tests;

/// <summary>The QEMU pieces that need no QEMU: the QMP client against a scripted server, the description, the Hello field, the page-hash dirty log, the guest's serial report.</summary>
public class QemuUnitTests
{
    /// <summary>A QMP server over a Unix socket that answers each request with <paramref name="answer"/>'s line (null: no answer), after a greeting.</summary>
    private sealed class FakeQmp : IDisposable
    {
        private readonly Socket _listener = new(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        private readonly Task _serving;
        public string Path { get; } = System.IO.Path.Combine(Directory.CreateTempSubdirectory("lmqmp").FullName, "qmp.sock");
        public List<string> Requests { get; } = [];

        public FakeQmp(Func<JsonObject, Socket, string?> answer, string greeting = """{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}""")
        {
            _listener.Bind(new UnixDomainSocketEndPoint(Path));
            _listener.Listen(1);
            _serving = Task.Run(() =>
            {
                using var s = _listener.Accept();
                using var stream = new NetworkStream(s);
                using var reader = new StreamReader(stream);
                var w = new StreamWriter(stream) { AutoFlush = true, NewLine = "\r\n" };
                w.WriteLine(greeting);
                while (reader.ReadLine() is { } line)
                {
                    var request = JsonNode.Parse(line)!.AsObject();
                    lock (Requests) Requests.Add(request["execute"]!.GetValue<string>());
                    if (request["execute"]!.GetValue<string>() == "qmp_capabilities") { w.WriteLine($$"""{"return": {}, "id": {{request["id"]}}}"""); continue; }
                    string? reply = answer(request, s);
                    if (reply == "close") return;
                    if (reply is not null) w.WriteLine(reply);
                }
            });
        }

        public void Dispose()
        {
            _listener.Dispose();
            _serving.Wait(TimeSpan.FromSeconds(5));
        }
    }

    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(10);

    [Fact]
    public async Task Qmp_negotiates_runs_commands_and_delivers_events()
    {
        using var server = new FakeQmp((r, _) => r["execute"]!.GetValue<string>() == "query-status"
            ? """{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}""" + "\r\n" + $$"""{"return": {"status": "paused", "running": false}, "id": {{r["id"]}}}"""
            : $$"""{"return": {}, "id": {{r["id"]}}}""");
        using var qmp = await QmpClient.ConnectAsync(server.Path, Bound);
        Assert.Equal("7.2.22", qmp.QemuVersion);
        var stop = qmp.NextEvent("STOP");
        var status = qmp.Execute("query-status")!.AsObject();
        Assert.Equal("paused", status["status"]!.GetValue<string>());
        Assert.Equal("STOP", (await stop.WaitAsync(Bound)).Name);
        lock (server.Requests) Assert.Equal(["qmp_capabilities", "query-status"], server.Requests);
    }

    [Fact]
    public async Task A_refused_command_is_a_QmpError_with_QEMUs_class_and_description()
    {
        using var server = new FakeQmp((r, _) => $$"""{"error": {"class": "GenericError", "desc": "Failed to get \"write\" lock"}, "id": {{r["id"]}}}""");
        using var qmp = await QmpClient.ConnectAsync(server.Path, Bound);
        var e = Assert.Throws<QmpError>(() => qmp.Execute("cont"));
        Assert.Equal("GenericError", e.Class);
        Assert.Equal("Failed to get \"write\" lock", e.Description);
        Assert.Equal("QEMU refused 'cont': GenericError: Failed to get \"write\" lock", e.Message);
    }

    [Fact]
    public async Task A_command_QEMU_does_not_answer_times_out_with_its_name()
    {
        using var server = new FakeQmp((_, _) => null);
        using var qmp = await QmpClient.ConnectAsync(server.Path, Bound);
        var e = Assert.Throws<QmpException>(() => qmp.Execute("migrate", timeout: TimeSpan.FromMilliseconds(200)));
        Assert.Equal("QEMU did not answer 'migrate' within 0.2 s", e.Message);
    }

    [Fact]
    public async Task A_QEMU_that_closes_the_connection_fails_the_command_waiting_and_every_later_one()
    {
        using var server = new FakeQmp((_, _) => "close");
        using var qmp = await QmpClient.ConnectAsync(server.Path, Bound);
        var e = Assert.Throws<QmpException>(() => qmp.Execute("stop", timeout: Bound));
        Assert.Contains("QEMU closed its QMP connection", e.Message);
        var later = Assert.Throws<QmpException>(() => qmp.Execute("cont"));
        Assert.Contains("cannot run 'cont'", later.Message);
        Assert.IsAssignableFrom<Vm.VmFailedException>(later); // the engines fail the migration with it, not reconnect
    }

    [Fact]
    public async Task No_QMP_socket_is_a_one_line_error_naming_it()
    {
        string path = Path.Combine(Path.GetTempPath(), $"lm-no-qmp-{Guid.NewGuid():N}.sock");
        var e = await Assert.ThrowsAsync<QmpException>(() => QmpClient.ConnectAsync(path, TimeSpan.FromMilliseconds(200)));
        Assert.Contains(path, e.Message);
        Assert.DoesNotContain('\n', e.Message);
        var gone = await Assert.ThrowsAsync<QmpException>(() => QmpClient.ConnectAsync(path, Bound, () => "exited with code 1"));
        Assert.StartsWith("QEMU exited with code 1 before its QMP socket", gone.Message);
    }

    [Fact]
    public void A_missing_QEMU_binary_is_a_one_line_error_that_says_how_to_install_it()
    {
        var dir = Directory.CreateTempSubdirectory("lmqemu-missing").FullName;
        var image = Path.Combine(dir, "boot.img");
        File.WriteAllBytes(image, new byte[512]);
        var host = new QemuHostOptions { Binary = "/nonexistent/qemu-system-x86_64", RunDirectory = Path.Combine(dir, "run"), RamDirectory = dir };
        var e = Assert.Throws<QmpException>(() => QemuProcess.Start(new QemuVmSpec { MemoryBytes = 32 << 20, BootImage = image }, host, "missing", incoming: false));
        Assert.StartsWith("QEMU not found: cannot run '/nonexistent/qemu-system-x86_64'", e.Message);
        Assert.Contains("scripts/install-qemu.sh", e.Message);
        Assert.Empty(Directory.GetFiles(dir, "*.ram")); // nothing left behind
    }

    [Fact]
    public void The_description_round_trips_and_a_hostile_one_is_refused_by_name()
    {
        var spec = new QemuVmSpec { MemoryBytes = 128 << 20, Vcpus = 2, BootImage = "/srv/images/boot.img" };
        Assert.Equal(spec, QemuVmSpec.Parse(spec.ToJson()));
        Assert.Contains("unknown field 'cmdline'", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"bootImage":"/a.img","cmdline":"-x"}""")).Message);
        Assert.Contains("not an absolute path", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"bootImage":"a.img"}""")).Message);
        Assert.Contains("comma", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"bootImage":"/a.img,if=none"}""")).Message);
        Assert.Contains("machine 'q99'", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"machine":"q99","memoryBytes":134217728,"bootImage":"/a.img"}""")).Message);
        Assert.Contains("vcpus is not an integer", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"vcpus":"2","bootImage":"/a.img"}""")).Message);
        Assert.Contains("not valid JSON", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("{")).Message);
        Assert.Contains("longer than 4096", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse(new string(' ', 5000))).Message);
        var linux = new QemuVmSpec { MemoryBytes = 256 << 20, Kernel = "/g/vmlinuz", Initrd = "/g/initrd.gz", Append = "console=ttyS0 quiet", Network = "user" };
        Assert.Equal(linux, QemuVmSpec.Parse(linux.ToJson()));
        Assert.Contains("either bootImage or kernel", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"bootImage":"/a.img","kernel":"/k"}""")).Message);
        Assert.Contains("either bootImage or kernel", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728}""")).Message);
        Assert.Contains("append must be", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","append":"a\nb"}""")).Message);
        Assert.Contains("initrd needs a kernel", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"bootImage":"/a.img","initrd":"/i"}""")).Message);
        Assert.Contains("network 'tap'", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","network":"tap"}""")).Message);
    }

    [Fact]
    public void Forwarded_guest_ports_are_validated_and_each_host_chooses_its_own_host_port()
    {
        var spec = new QemuVmSpec { MemoryBytes = 256 << 20, Kernel = "/g/vmlinuz", Network = "user", Forward = [6379, 22] };
        Assert.Equal(spec, QemuVmSpec.Parse(spec.ToJson()));
        Assert.Contains("\"forward\":[6379,22]", spec.ToJson());
        Assert.NotEqual(spec, spec with { Forward = [6379] });
        Assert.Contains("forward needs network \"user\"", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","forward":[6379]}""")).Message);
        Assert.Contains("port 70000 is out of range", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","network":"user","forward":[70000]}""")).Message);
        Assert.Contains("port 0 is out of range", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","network":"user","forward":[0]}""")).Message);
        Assert.Contains("lists a port twice", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","network":"user","forward":[80,80]}""")).Message);
        Assert.Contains("at most 8 ports", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","network":"user","forward":[1,2,3,4,5,6,7,8,9]}""")).Message);
        Assert.Contains("other than a port number", Assert.Throws<InvalidDataException>(() => QemuVmSpec.Parse("""{"memoryBytes":134217728,"kernel":"/k","network":"user","forward":["6379:16379"]}""")).Message);

        // The description names guest ports only: the host port is the host's (a fixed one, or 0 for one the kernel picks), always on 127.0.0.1.
        string Netdev(IReadOnlyDictionary<int, int>? hostPorts)
        {
            var a = QemuCommandLine.Build(spec, "/dev/shm/r", "/tmp/q.sock", "/tmp/s.log", incoming: true, hostPorts);
            return a[a.IndexOf("-netdev") + 1];
        }
        Assert.Equal("user,id=net0,hostfwd=tcp:127.0.0.1:0-:6379,hostfwd=tcp:127.0.0.1:0-:22", Netdev(null));
        Assert.Equal("user,id=net0,hostfwd=tcp:127.0.0.1:16379-:6379,hostfwd=tcp:127.0.0.1:0-:22", Netdev(new Dictionary<int, int> { [6379] = 16379 }));
    }

    [Fact]
    public void The_ports_QEMU_bound_are_read_from_info_usernet()
    {
        const string text = "Hub -1 (net0):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
            + "  TCP[HOST_FORWARD]   8       127.0.0.1 33095       10.0.2.15  6379     0     0\r\n"
            + "  TCP[ESTABLISHED]   27       127.0.0.1 41000       10.0.2.15  6379     0     0\r\n"
            + "  TCP[HOST_FORWARD]   9       127.0.0.1 2222       10.0.2.15    22     0     0\r\n";
        var ports = QemuProcess.UserNetForwards(text);
        Assert.Equal(2, ports.Count);
        Assert.Equal(33095, ports[6379]);
        Assert.Equal(2222, ports[22]);
    }

    [Fact]
    public void The_destination_allows_boot_images_only_inside_its_directories_after_resolving_links()
    {
        var root = Directory.CreateTempSubdirectory("lmqemu-allow").FullName;
        var allowed = Directory.CreateDirectory(Path.Combine(root, "images")).FullName;
        var outside = Directory.CreateDirectory(Path.Combine(root, "secret")).FullName;
        File.WriteAllBytes(Path.Combine(allowed, "boot.img"), new byte[512]);
        File.WriteAllBytes(Path.Combine(outside, "key.img"), new byte[512]);
        File.CreateSymbolicLink(Path.Combine(allowed, "link.img"), Path.Combine(outside, "key.img"));
        var host = new QemuHostOptions { AllowedImageDirectories = [allowed] };
        QemuVmSpec Spec(string path) => new() { MemoryBytes = 32 << 20, BootImage = path };
        Assert.Null(host.Refusal(Spec(Path.Combine(allowed, "boot.img"))));
        Assert.Contains("outside the directories", host.Refusal(Spec(Path.Combine(outside, "key.img"))));
        Assert.Contains("outside the directories", host.Refusal(Spec(Path.Combine(allowed, "link.img"))));
        Assert.Contains("outside the directories", host.Refusal(Spec(Path.Combine(allowed, "..", "secret", "key.img"))));
        Assert.Contains("does not exist", host.Refusal(Spec(Path.Combine(allowed, "none.img"))));
        Assert.Contains("--qemu-allow", new QemuHostOptions().Refusal(Spec(Path.Combine(allowed, "boot.img"))));
    }

    [Fact]
    public void The_Hello_carries_the_VM_description_only_when_there_is_one()
    {
        var builtin = new HelloMessage(2, 2, Capabilities.Raw, Capabilities.Raw, 1 << 20, 4096, 1, Guid.NewGuid(), "vm", "builtin");
        var buf = new byte[8192];
        int n = builtin.Write(buf);
        Assert.Equal(builtin, HelloMessage.Parse(buf.AsSpan(0, n)));
        string spec = new QemuVmSpec { MemoryBytes = 1 << 20 << 5, BootImage = "/img/boot.img" }.ToJson();
        var qemu = builtin with { VmKind = "qemu", VmSpec = spec };
        n = (builtin with { VmKind = "qemu" }).Write(buf);
        int m = qemu.Write(buf);
        Assert.Equal(n + 2 + Encoding.UTF8.GetByteCount(spec), m); // a built-in VM's Hello is unchanged: the field is appended only when present
        Assert.Equal(qemu, HelloMessage.Parse(buf.AsSpan(0, m)));
        Assert.Throws<ArgumentException>(() => (builtin with { VmSpec = new string('x', 5000) }).Write(buf));
    }

    [Fact]
    public void The_page_hash_log_reports_pages_whose_content_differs_from_what_was_sent()
    {
        using var memory = GuestMemory.Create(64 * GuestMemory.PageSize);
        var sent = new PageHashes(memory.PageCount);
        using var log = new PageHashDirtyLog(memory);
        log.Start();
        log.CompareWithSent(sent);
        // Writes through the mapping, as another process's would be: no NoteWrite, no fault.
        memory.Page(3)[0] = 1;
        memory.Page(40)[100] = 2;
        var dirty = new PageBitmap(memory.PageCount);
        Assert.Equal(2, log.Harvest(dirty));
        Assert.True(dirty.IsSet(3) && dirty.IsSet(40));
        // The engine sent page 3 as it is now and page 40 before a later write: only 40 differs from the destination's copy.
        sent.Set(3, memory.Page(3));
        sent.Set(40, memory.Page(40));
        memory.Page(40)[100] = 3;
        dirty.ClearAll();
        Assert.Equal(1, log.Harvest(dirty));
        Assert.True(dirty.IsSet(40));
        // A page written back to what was sent needs nothing.
        memory.Page(40)[100] = 2;
        dirty.ClearAll();
        Assert.Equal(0, log.Harvest(dirty));
        // A page harvested as A, written B just before the engine read and sent it, then written A again:
        // the same content as at the last harvest, but not what the destination holds — reported.
        memory.Page(5)[0] = 0xA;
        dirty.ClearAll();
        Assert.Equal(1, log.Harvest(dirty));
        memory.Page(5)[0] = 0xB;
        sent.Set(5, memory.Page(5));
        memory.Page(5)[0] = 0xA;
        dirty.ClearAll();
        Assert.Equal(1, log.Harvest(dirty));
        Assert.True(dirty.IsSet(5));
        var gone = new PageHashDirtyLog(memory, () => "QEMU was killed by signal 9");
        gone.Start();
        Assert.Equal("QEMU was killed by signal 9", Assert.Throws<Vm.VmFailedException>(() => gone.Harvest(dirty)).Message);
    }

    [Fact]
    public void The_serial_report_is_read_from_the_last_complete_line()
    {
        string log = "livemig-bootsector range 00100000-06500000\npasses 00000010 errors 00000000\npasses 00000020 errors 00000003\npasses 0000";
        Assert.True(BootSectorSerial.IsBootSector(log));
        Assert.Equal(new BootSectorReport(0x20, 3), BootSectorSerial.Last(log));
        Assert.Null(BootSectorSerial.Last("livemig-bootsector range 00100000-06500000\n"));
        Assert.Null(BootSectorSerial.Parse("passes zzzzzzzz errors 00000000"));
    }
}
