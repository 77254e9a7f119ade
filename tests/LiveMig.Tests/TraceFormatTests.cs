using LiveMig.Traces;

namespace LiveMig.Tests;

public class TraceFormatTests
{
    internal static TraceInterval Interval(int index, int space, params int[] pages) => new()
    {
        Index = index, Start = TimeSpan.FromMilliseconds(100 * index), Duration = TimeSpan.FromMilliseconds(100), PageSpace = space,
        Pages = pages,
        Content = pages.Select(p => p == 7 ? PageContent.Duplicate : (PageContent)(p % 6)).ToArray(),
        DuplicateOf = pages.Select(p => p == 7 ? 3 : -1).ToArray(),
        BytesChanged = pages.Select(p => (ushort)(index == 0 ? 4096 : 1 + p % 100)).ToArray(),
    };

    internal static byte[] Sample(Action<TraceWriter>? more = null, bool seal = true)
    {
        var ms = new MemoryStream();
        using var w = new TraceWriter(ms, new TraceHeader { Source = "test \"prog\"", Started = DateTimeOffset.FromUnixTimeMilliseconds(1_700_000_000_000) });
        w.Write(Interval(0, 20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9));
        w.Write(Interval(1, 20, 1, 2, 3, 7, 19));
        w.Write(Interval(2, 40, 3, 39));
        more?.Invoke(w);
        if (seal) w.Seal(TraceEndReason.TargetExited, "exit 0");
        return ms.ToArray();
    }

    [Fact]
    public void Round_trip_keeps_every_field()
    {
        var t = TraceFile.Read(Sample());
        Assert.Equal("test \"prog\"", t.Header.Source);
        Assert.Equal(TimeSpan.FromMilliseconds(100), t.Header.NominalInterval);
        Assert.Equal(3, t.Intervals.Count);
        Assert.Equal(new TraceEnd { Intervals = 3, PageSpace = 40, Duration = TimeSpan.FromMilliseconds(300), Reason = TraceEndReason.TargetExited, Note = "exit 0" }, t.End);
        var expected = Interval(1, 20, 1, 2, 3, 7, 19);
        var got = t.Intervals[1];
        Assert.Equal(expected.Pages, got.Pages);
        Assert.Equal(expected.Content, got.Content);
        Assert.Equal(expected.DuplicateOf, got.DuplicateOf);
        Assert.Equal(expected.BytesChanged, got.BytesChanged);
        Assert.Equal(TimeSpan.FromMilliseconds(100), got.Start);
        Assert.True(t.Intervals[0].IsInitialImage);
    }

    [Fact]
    public void Every_truncation_is_a_clear_error()
    {
        byte[] full = Sample();
        for (int len = 0; len < full.Length; len++)
        {
            var e = Assert.Throws<InvalidDataException>(() => TraceFile.Read(full.AsSpan(0, len).ToArray()));
            Assert.StartsWith("trace: ", e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }
    }

    [Fact]
    public void Unsealed_trace_is_refused()
    {
        var e = Assert.Throws<InvalidDataException>(() => TraceFile.Read(Sample(seal: false)));
        Assert.Contains("without its end record", e.Message);
    }

    [Fact]
    public void Every_flipped_byte_is_detected()
    {
        byte[] full = Sample();
        var rng = new Random(14);
        for (int i = 0; i < full.Length; i++)
        {
            byte[] bad = (byte[])full.Clone();
            bad[i] ^= (byte)(1 << rng.Next(8));
            Assert.Throws<InvalidDataException>(() => TraceFile.Read(bad));
        }
    }

    [Fact]
    public void Unknown_version_names_both_versions()
    {
        byte[] bad = Sample();
        bad[4] = 9;
        var e = Assert.Throws<InvalidDataException>(() => TraceFile.Read(bad));
        Assert.Equal("trace: format version 9 is not supported (this build reads 1)", e.Message);
    }

    [Fact]
    public void Writer_refuses_unsorted_pages()
    {
        using var w = new TraceWriter(new MemoryStream(), new TraceHeader());
        Assert.Throws<ArgumentException>(() => w.Write(Interval(0, 10, 3, 2)));
    }

    [Fact]
    public void File_appears_under_its_name_only_when_sealed()
    {
        string dir = Directory.CreateTempSubdirectory("lmtrace").FullName;
        try
        {
            string path = Path.Combine(dir, "a.lmtrace");
            using (var w = TraceWriter.Create(path, new TraceHeader()))
            {
                w.Write(Interval(0, 4, 0, 1));
                Assert.False(File.Exists(path));
                Assert.True(File.Exists(path + TraceWriter.PartialSuffix));
            }
            Assert.False(File.Exists(path + TraceWriter.PartialSuffix)); // abandoned: removed, never renamed
            Assert.False(File.Exists(path));
            using (var w = TraceWriter.Create(path, new TraceHeader()))
            {
                w.Write(Interval(0, 4, 0, 1));
                w.Seal(TraceEndReason.Completed);
            }
            Assert.True(File.Exists(path));
            Assert.False(File.Exists(path + TraceWriter.PartialSuffix));
            Assert.Single(TraceFile.Load(path).Intervals);
        }
        finally { Directory.Delete(dir, true); }
    }
}

public class PageSpaceTests
{
    private static PageSpace.Key Private(int pid, ulong page) => new(false, (ulong)pid, 0, page);

    [Fact]
    public void Pages_of_an_exited_process_are_reused_and_their_first_write_is_a_change()
    {
        var s = new PageSpace();
        var page = new byte[4096];
        page[10] = 1;
        s.NextScan();
        Assert.True(s.Observe(Private(5, 100), page, initial: true, out int a, out _, out _, out int changed));
        Assert.Equal(4096, changed);
        Assert.False(s.Observe(Private(5, 100), page, initial: false, out _, out _, out _, out _)); // unchanged
        s.ForgetProcessesExcept(new HashSet<int> { 1 });
        Assert.Equal(-1, s.IndexOf(Private(5, 100)));
        page[11] = 2;
        Assert.True(s.Observe(Private(6, 7), page, initial: false, out int b, out var content, out _, out changed));
        Assert.Equal(a, b);
        Assert.Equal(1, changed); // against the exited page's last bytes
        Assert.Equal(PageContent.VeryCompressible, content);
        Assert.Equal(1, s.Count);
    }

    [Fact]
    public void A_page_with_the_bytes_of_another_is_a_duplicate_of_it()
    {
        var s = new PageSpace();
        var page = new byte[4096];
        page[0] = 7;
        s.NextScan();
        s.Observe(Private(1, 1), page, initial: true, out int first, out _, out _, out _);
        s.Observe(Private(1, 2), page, initial: true, out _, out var content, out int dup, out _);
        Assert.Equal(PageContent.Duplicate, content);
        Assert.Equal(first, dup);
    }
}
