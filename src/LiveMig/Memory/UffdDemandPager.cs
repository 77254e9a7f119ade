namespace LiveMig.Memory;

/// <summary>Placeholder until the native helper lands.</summary>
public sealed class UffdDemandPager : DemandPager
{
    private UffdDemandPager(GuestMemory memory, NativePageBitmap present, PageHashes? hashes) : base(memory, present, hashes) { }
    public override string Mode => "userfaultfd";
    public static bool TryCreate(GuestMemory memory, NativePageBitmap present, NativePageBitmap pending, PageHashes? hashes, bool checkAccess, out UffdDemandPager? pager, out string? why)
    {
        pager = null; why = "not built"; return false;
    }
    public override void Fault(long page) => throw new NotSupportedException();
    public override bool Place(long page, ReadOnlySpan<byte> content) => throw new NotSupportedException();
    public void ServeConnection(Stream stream, Action onBroken) { }
    public void DropConnection() { }
    public void Stop() { }
}
