using LiveMig.Memory;

namespace LiveMig.DirtyTracking;

/// <summary>
/// A bitmap set by the guest's own write path (<see cref="GuestMemory.NoteWrite"/>): portable,
/// and exact as long as every write goes through that path.
/// </summary>
public sealed class SoftwareDirtyLog : IDirtyLog
{
    private readonly GuestMemory _memory;
    private readonly PageBitmap _written;

    public SoftwareDirtyLog(GuestMemory memory)
    {
        _memory = memory;
        _written = new PageBitmap(memory.PageCount);
    }

    public string Name => "software";
    public bool IsTracking { get; private set; }

    public void Start()
    {
        _written.ClearAll();
        _memory.AttachSoftwareWriteLog(_written);
        IsTracking = true;
    }

    public long Harvest(PageBitmap into) => _written.HarvestInto(into);

    public bool CanPeek => true;

    public bool WrittenSinceHarvest(long page) => _written.IsSet(page);

    public void Stop()
    {
        _memory.AttachSoftwareWriteLog(null);
        IsTracking = false;
    }

    public void Dispose() => Stop();
}
