using System.Text;
using System.Text.Json;

namespace LiveMig.Qemu;

/// <summary>
/// The small description a QEMU guest is started from, at the source and — sent in the Hello —
/// at the destination, which builds QEMU's command line from it itself (<see cref="QemuCommandLine"/>):
/// a source never makes a destination run a command line of its choosing. Both sides build the
/// same devices from the same description, which QEMU's device-state stream needs.
/// <code>
/// {"machine":"pc","accel":"tcg","memoryBytes":134217728,"vcpus":1,"bootImage":"/path/bootsector.img"}
/// {"machine":"pc","accel":"tcg","memoryBytes":536870912,"vcpus":1,"kernel":"/p/vmlinuz","initrd":"/p/initrd.gz","append":"console=ttyS0 quiet","network":"user","forward":[6379]}
/// </code>
/// The guest boots either a raw image (<see cref="BootImage"/>) or a kernel (<see cref="Kernel"/>,
/// optionally <see cref="Initrd"/> and <see cref="Append"/>), never both.
/// </summary>
public sealed record QemuVmSpec
{
    /// <summary>Machine types this version builds (the ones tested: i440fx "pc").</summary>
    public static readonly IReadOnlyList<string> Machines = ["pc"];
    /// <summary>Accelerators: TCG (works everywhere; docs/qemu.md) and KVM.</summary>
    public static readonly IReadOnlyList<string> Accelerators = ["tcg", "kvm"];
    public const int MaxVcpus = 64;
    public const long MinMemoryBytes = 2L << 20;
    /// <summary>Longest description accepted on the wire (it travels in the Hello).</summary>
    public const int MaxBytes = 4096;

    public string Machine { get; init; } = "pc";
    public string Accel { get; init; } = "tcg";
    public required long MemoryBytes { get; init; }
    public int Vcpus { get; init; } = 1;
    /// <summary>A raw boot image (the boot-sector guest), attached as a read-only floppy; an absolute path.</summary>
    public string? BootImage { get; init; }
    /// <summary>A Linux kernel QEMU loads itself (<c>-kernel</c>; the Linux guest, guests/linux); an absolute path.</summary>
    public string? Kernel { get; init; }
    /// <summary>With <see cref="Kernel"/>: its initramfs (<c>-initrd</c>).</summary>
    public string? Initrd { get; init; }
    /// <summary>With <see cref="Kernel"/>: its command line (printable ASCII, at most 512 characters).</summary>
    public string? Append { get; init; }
    /// <summary>"none", or "user": a virtio-net card on QEMU's user networking.</summary>
    public string Network { get; init; } = "none";

    public static readonly IReadOnlyList<string> Networks = ["none", "user"];

    /// <summary>Most forwarded ports a description may ask for.</summary>
    public const int MaxForwards = 8;

    /// <summary>
    /// With <c>network: "user"</c>: guest TCP ports each host forwards a port of its own loopback
    /// to. The description names only the guest's side: which host port each side listens on is
    /// that host's choice (<see cref="QemuHostOptions.ForwardHostPorts"/>, by default one the
    /// kernel picks; <see cref="QemuProcess.ForwardedPorts"/> says which), so a source never
    /// makes a destination listen on a port of its choosing, and two sides on one host do not collide.
    /// </summary>
    public IReadOnlyList<int> Forward { get; init; } = [];

    /// <summary>Field by field, <see cref="Forward"/> by its ports (a record compares lists by reference).</summary>
    public bool Equals(QemuVmSpec? other) =>
        other is not null && Machine == other.Machine && Accel == other.Accel && MemoryBytes == other.MemoryBytes && Vcpus == other.Vcpus
        && BootImage == other.BootImage && Kernel == other.Kernel && Initrd == other.Initrd && Append == other.Append
        && Network == other.Network && Forward.SequenceEqual(other.Forward);

    public override int GetHashCode() => HashCode.Combine(Machine, MemoryBytes, Vcpus, BootImage, Kernel, Network, Forward.Count);

    /// <summary>The files the guest boots from (the destination checks each against its allowed directories).</summary>
    public IEnumerable<string> Files => new[] { BootImage, Kernel, Initrd }.OfType<string>();

    /// <summary>Why this description cannot run, or null. <paramref name="where"/> names it in the message.</summary>
    public string? Error(string where = "QEMU VM description")
    {
        if (!Machines.Contains(Machine)) return $"{where}: machine '{Printable(Machine)}' is not one of {string.Join(", ", Machines)}";
        if (!Accelerators.Contains(Accel)) return $"{where}: accel '{Printable(Accel)}' is not one of {string.Join(", ", Accelerators)}";
        if (MemoryBytes < MinMemoryBytes || MemoryBytes % (1 << 20) != 0) return $"{where}: memory {MemoryBytes} bytes is not a whole number of MiB of at least 2 MiB";
        if (Vcpus < 1 || Vcpus > MaxVcpus) return $"{where}: {Vcpus} vCPUs is out of range (1..{MaxVcpus})";
        if (!Networks.Contains(Network)) return $"{where}: network '{Printable(Network)}' is not one of {string.Join(", ", Networks)}";
        if (ForwardError() is { } badForward) return $"{where}: forward {badForward}";
        if ((BootImage is null) == (Kernel is null)) return $"{where}: give either bootImage or kernel (and not both)";
        if (BootImage is not null && PathError(BootImage) is { } bad) return $"{where}: bootImage {bad}";
        if (Kernel is not null && PathError(Kernel) is { } badKernel) return $"{where}: kernel {badKernel}";
        if (Initrd is not null && (Kernel is null || PathError(Initrd) is not null)) return $"{where}: initrd {(Kernel is null ? "needs a kernel" : PathError(Initrd))}";
        if (Append is not null && (Kernel is null || Append.Length > 512 || Append.Any(c => c is < ' ' or > '~')))
            return $"{where}: append {(Kernel is null ? "needs a kernel" : "must be at most 512 printable ASCII characters")}";
        return null;
    }

    private string? ForwardError()
    {
        if (Forward.Count == 0) return null;
        if (Network != "user") return "needs network \"user\"";
        if (Forward.Count > MaxForwards) return $"lists {Forward.Count} ports (at most {MaxForwards})";
        foreach (int port in Forward)
            if (port is < 1 or > 65535) return $"port {port} is out of range (1..65535)";
        if (Forward.Distinct().Count() != Forward.Count) return "lists a port twice";
        return null;
    }

    /// <summary>Why <paramref name="path"/> cannot be handed to QEMU as a file name, or null: absolute, printable, no comma (QEMU's option syntax).</summary>
    internal static string? PathError(string? path)
    {
        if (string.IsNullOrEmpty(path)) return "is missing";
        if (!Path.IsPathFullyQualified(path)) return $"'{Printable(path)}' is not an absolute path";
        if (path.Length > 1024) return "is longer than 1024 characters";
        if (path.Any(c => char.IsControl(c) || c == ',')) return $"'{Printable(path)}' contains a comma or a control character (QEMU's option syntax)";
        return null;
    }

    private static string Printable(string s)
    {
        var b = new StringBuilder();
        foreach (char c in s.Length > 80 ? s[..80] : s) b.Append(char.IsControl(c) ? '?' : c);
        return b.ToString();
    }

    public string ToJson()
    {
        using var m = new MemoryStream();
        using (var w = new Utf8JsonWriter(m))
        {
            w.WriteStartObject();
            w.WriteString("machine", Machine);
            w.WriteString("accel", Accel);
            w.WriteNumber("memoryBytes", MemoryBytes);
            w.WriteNumber("vcpus", Vcpus);
            if (BootImage is not null) w.WriteString("bootImage", BootImage);
            if (Kernel is not null) w.WriteString("kernel", Kernel);
            if (Initrd is not null) w.WriteString("initrd", Initrd);
            if (Append is not null) w.WriteString("append", Append);
            if (Network != "none") w.WriteString("network", Network);
            if (Forward.Count > 0)
            {
                w.WriteStartArray("forward");
                foreach (int port in Forward) w.WriteNumberValue(port);
                w.WriteEndArray();
            }
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(m.ToArray());
    }

    /// <summary>
    /// Parses a description from a peer: a JSON object with exactly the known fields, each of its
    /// type, at most <see cref="MaxBytes"/>; then <see cref="Error"/>. Anything else is an
    /// <see cref="InvalidDataException"/> whose message says what (never echoing much of it).
    /// </summary>
    public static QemuVmSpec Parse(string json)
    {
        const string where = "QEMU VM description";
        if (Encoding.UTF8.GetByteCount(json) > MaxBytes) throw new InvalidDataException($"{where} is longer than {MaxBytes} bytes");
        JsonDocument doc;
        try { doc = JsonDocument.Parse(json, new JsonDocumentOptions { MaxDepth = 4 }); }
        catch (JsonException e) { throw new InvalidDataException($"{where} is not valid JSON: {e.Message.ReplaceLineEndings(" ")}"); }
        using (doc)
        {
            if (doc.RootElement.ValueKind != JsonValueKind.Object) throw new InvalidDataException($"{where} is not a JSON object");
            string? machine = null, accel = null, image = null, kernel = null, initrd = null, append = null, network = null;
            long? memory = null;
            int? vcpus = null;
            List<int>? forward = null;
            foreach (var p in doc.RootElement.EnumerateObject())
            {
                switch (p.Name)
                {
                    case "machine": machine = Text(p); break;
                    case "accel": accel = Text(p); break;
                    case "bootImage": image = Text(p); break;
                    case "kernel": kernel = Text(p); break;
                    case "initrd": initrd = Text(p); break;
                    case "append": append = Text(p); break;
                    case "network": network = Text(p); break;
                    case "memoryBytes": memory = p.Value.ValueKind == JsonValueKind.Number && p.Value.TryGetInt64(out long m) ? m : throw new InvalidDataException($"{where}: memoryBytes is not an integer"); break;
                    case "forward": forward = Ports(p); break;
                    case "vcpus": vcpus = p.Value.ValueKind == JsonValueKind.Number && p.Value.TryGetInt32(out int v) ? v : throw new InvalidDataException($"{where}: vcpus is not an integer"); break;
                    default: throw new InvalidDataException($"{where}: unknown field '{Printable(p.Name)}'");
                }
            }
            var spec = new QemuVmSpec
            {
                Machine = machine ?? "pc", Accel = accel ?? "tcg",
                MemoryBytes = memory ?? throw new InvalidDataException($"{where}: memoryBytes is missing"),
                Vcpus = vcpus ?? 1,
                BootImage = image, Kernel = kernel, Initrd = initrd, Append = append, Network = network ?? "none",
                Forward = forward ?? [],
            };
            if (spec.Error(where) is { } why) throw new InvalidDataException(why);
            return spec;
        }

        static List<int> Ports(JsonProperty p)
        {
            if (p.Value.ValueKind != JsonValueKind.Array || p.Value.GetArrayLength() > MaxForwards) throw new InvalidDataException($"{where}: forward is not a list of at most {MaxForwards} ports");
            var ports = new List<int>();
            foreach (var e in p.Value.EnumerateArray())
                ports.Add(e.ValueKind == JsonValueKind.Number && e.TryGetInt32(out int port) ? port : throw new InvalidDataException($"{where}: forward holds something other than a port number"));
            return ports;
        }

        static string Text(JsonProperty p) => p.Value.ValueKind == JsonValueKind.String ? p.Value.GetString()! : throw new InvalidDataException($"{where}: {p.Name} is not a string");
    }
}
