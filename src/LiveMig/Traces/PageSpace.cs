using System.IO.Hashing;

namespace LiveMig.Traces;

/// <summary>
/// The recorder's memory of the target: a dense index for every page it has seen, each page's
/// last hash (xxHash3) and bytes, and the content of pages by hash for duplicate detection.
/// <see cref="Observe"/> turns a page's current bytes into a change, or none.
/// </summary>
internal sealed class PageSpace
{
    /// <summary>A page's identity: a shared mapping's page by file (so a page several processes share counts once), a private one by process and address.</summary>
    public readonly record struct Key(bool Shared, ulong A, ulong B, ulong Page);

    public static readonly ulong ZeroHash = XxHash3.HashToUInt64(new byte[PageClasses.PageSize]);

    private readonly Dictionary<Key, int> _index = [];
    private readonly List<ulong> _hash = [];
    private readonly List<byte[]?> _bytes = []; // null while zero
    private readonly Dictionary<ulong, int> _byHash = [];
    private readonly List<int> _seenInScan = [];
    private readonly Dictionary<ulong, List<Key>> _keysByProcess = [];
    private readonly Stack<int> _free = new();
    private int _scan;

    /// <summary>Starts a new scan: pages are read at most once per scan (a shared page mapped by several processes, once).</summary>
    public void NextScan() => _scan++;

    /// <summary>Whether this page was already observed in the current scan.</summary>
    public bool SeenInScan(Key key) => _index.TryGetValue(key, out int i) && _seenInScan[i] == _scan;

    public int Count => _hash.Count;

    /// <summary>
    /// A new page takes the index of a page whose process has exited, if any (its last content
    /// stays, so the first write counts as a change, as a guest reusing a freed frame would
    /// write it); else a new index, growing the page space.
    /// </summary>
    private int Allocate()
    {
        if (_free.TryPop(out int reused)) return reused;
        _hash.Add(ZeroHash);
        _bytes.Add(null);
        _seenInScan.Add(0);
        return _hash.Count - 1;
    }

    /// <summary>Frees the indices of the private pages of processes not in <paramref name="alive"/> (they exited).</summary>
    public void ForgetProcessesExcept(IReadOnlySet<int> alive)
    {
        foreach (ulong pid in _keysByProcess.Keys.Where(p => !alive.Contains((int)p)).ToList())
        {
            foreach (var key in _keysByProcess[pid])
            {
                _free.Push(_index[key]);
                _index.Remove(key);
            }
            _keysByProcess.Remove(pid);
        }
    }

    public int IndexOf(Key key) => _index.TryGetValue(key, out int i) ? i : -1;

    /// <summary>Bytes the recorder keeps for the last content of non-zero pages.</summary>
    public long ShadowBytes { get; private set; }

    /// <summary>
    /// Takes the page's bytes now. Returns false when it has not changed since last seen (a page
    /// seen for the first time counts as changed from zero unless <paramref name="initial"/>, when
    /// every page is part of the initial image).
    /// </summary>
    public bool Observe(Key key, ReadOnlySpan<byte> page, bool initial, out int index, out PageContent content, out int duplicateOf, out int bytesChanged)
    {
        ulong h = XxHash3.HashToUInt64(page);
        bool fresh = !_index.TryGetValue(key, out index);
        if (fresh)
        {
            index = Allocate();
            _index.Add(key, index);
            if (!key.Shared) (_keysByProcess.TryGetValue(key.A, out var keys) ? keys : _keysByProcess[key.A] = []).Add(key);
        }
        _seenInScan[index] = _scan;
        content = PageContent.Zero;
        duplicateOf = -1;
        bytesChanged = 0;
        if (!(initial && fresh) && _hash[index] == h) return false;
        byte[]? before = _bytes[index];
        bool zero = h == ZeroHash && PageClassifier.IsZero(page);
        bytesChanged = initial ? PageClasses.PageSize : before is null ? PageClassifier.NonZeroBytes(page) : PageClassifier.BytesChanged(before, page);
        if (bytesChanged == 0) bytesChanged = PageClasses.PageSize; // a hash collision of different bytes, or a zero page in the initial image
        _hash[index] = h;
        if (zero)
        {
            if (before is not null) ShadowBytes -= PageClasses.PageSize;
            _bytes[index] = null;
            return true;
        }
        if (before is null) { before = _bytes[index] = new byte[PageClasses.PageSize]; ShadowBytes += PageClasses.PageSize; }
        page.CopyTo(before);
        if (_byHash.TryGetValue(h, out int q) && q != index && _hash[q] == h && _bytes[q] is { } other && other.AsSpan().SequenceEqual(page))
        {
            content = PageContent.Duplicate;
            duplicateOf = q;
        }
        else
        {
            _byHash[h] = index;
            content = PageClassifier.Classify(page);
        }
        return true;
    }
}
