namespace LiveMig.Traces;

/// <summary>
/// An interval record's bytes before compression: index, start µs, duration µs, page space,
/// count, then the written pages as runs (varint gap from the previous run's end, varint
/// length), then per page its content byte, for a duplicate the page it copies, and the bytes
/// changed (all varints).
/// </summary>
internal static class TraceIntervalCodec
{
    public const int MaxPageSpace = int.MaxValue - 1;

    public static byte[] Encode(TraceInterval iv)
    {
        Check(iv);
        var s = new MemoryStream(16 + iv.Count * 3);
        TraceFormat.WriteVarint(s, (ulong)iv.Index);
        TraceFormat.WriteVarint(s, (ulong)(iv.Start.Ticks / 10));
        TraceFormat.WriteVarint(s, (ulong)(iv.Duration.Ticks / 10));
        TraceFormat.WriteVarint(s, (ulong)iv.PageSpace);
        TraceFormat.WriteVarint(s, (ulong)iv.Count);
        long end = 0; // one past the previous run
        for (int i = 0; i < iv.Count;)
        {
            int j = i + 1;
            while (j < iv.Count && iv.Pages[j] == iv.Pages[j - 1] + 1) j++;
            TraceFormat.WriteVarint(s, (ulong)(iv.Pages[i] - end));
            TraceFormat.WriteVarint(s, (ulong)(j - i));
            end = iv.Pages[j - 1] + 1L;
            i = j;
        }
        for (int i = 0; i < iv.Count; i++)
        {
            s.WriteByte((byte)iv.Content[i]);
            if (iv.Content[i] == PageContent.Duplicate) TraceFormat.WriteVarint(s, (ulong)iv.DuplicateOf[i]);
            TraceFormat.WriteVarint(s, iv.BytesChanged[i]);
        }
        return s.ToArray();
    }

    /// <summary>The writer refuses what the reader would refuse, so a sealed file always reads back.</summary>
    private static void Check(TraceInterval iv)
    {
        if (iv.Content.Length != iv.Count || iv.DuplicateOf.Length != iv.Count || iv.BytesChanged.Length != iv.Count)
            throw new ArgumentException("interval arrays differ in length");
        for (int i = 0; i < iv.Count; i++)
        {
            if (iv.Pages[i] < 0 || iv.Pages[i] >= iv.PageSpace || (i > 0 && iv.Pages[i] <= iv.Pages[i - 1]))
                throw new ArgumentException($"interval {iv.Index}: pages must be sorted, distinct and below the page space ({iv.PageSpace})");
            if (iv.Content[i] == PageContent.Duplicate && (iv.DuplicateOf[i] < 0 || iv.DuplicateOf[i] >= iv.PageSpace || iv.DuplicateOf[i] == iv.Pages[i]))
                throw new ArgumentException($"interval {iv.Index}: page {iv.Pages[i]} duplicates an invalid page {iv.DuplicateOf[i]}");
            if (iv.Content[i] > PageContent.Duplicate || iv.BytesChanged[i] > PageClasses.PageSize)
                throw new ArgumentException($"interval {iv.Index}: bad content model for page {iv.Pages[i]}");
        }
    }

    public static TraceInterval Decode(ReadOnlySpan<byte> data, string where)
    {
        var c = new RecordCursor(data, where);
        int index = c.Int(int.MaxValue, "interval index");
        long start = (long)Math.Min(c.Varint(), (ulong)(TimeSpan.MaxValue.Ticks / 10));
        long duration = (long)Math.Min(c.Varint(), (ulong)(TimeSpan.MaxValue.Ticks / 10));
        int space = c.Int(MaxPageSpace, "page space");
        // Each page costs at least two bytes below (content and bytes changed): a larger count is corruption.
        int count = c.Int(Math.Min(space, data.Length / 2), "page count");
        var pages = new int[count];
        long next = 0;
        for (int i = 0; i < count;)
        {
            long first = next + (long)Math.Min(c.Varint(), (ulong)space);
            int run = c.Int(count - i, "run length");
            if (run == 0 || first + run > space) throw c.Bad($"has a run of pages outside the page space ({space})");
            for (int k = 0; k < run; k++) pages[i++] = (int)(first + k);
            next = first + run;
        }
        var content = new PageContent[count];
        var dup = new int[count];
        var changed = new ushort[count];
        for (int i = 0; i < count; i++)
        {
            byte b = c.Byte();
            if (b > (byte)PageContent.Duplicate) throw c.Bad($"has unknown page content {b} for page {pages[i]}");
            content[i] = (PageContent)b;
            dup[i] = content[i] == PageContent.Duplicate ? c.Int(space - 1, "duplicate target") : -1;
            changed[i] = (ushort)c.Int(PageClasses.PageSize, "bytes changed");
        }
        if (!c.AtEnd) throw c.Bad("has trailing bytes");
        return new TraceInterval
        {
            Index = index, Start = TimeSpan.FromTicks(start * 10), Duration = TimeSpan.FromTicks(duration * 10), PageSpace = space,
            Pages = pages, Content = content, DuplicateOf = dup, BytesChanged = changed,
        };
    }

    public static byte[] EncodeEnd(TraceEnd e)
    {
        var s = new MemoryStream();
        TraceFormat.WriteVarint(s, (ulong)e.Intervals);
        TraceFormat.WriteVarint(s, (ulong)e.PageSpace);
        TraceFormat.WriteVarint(s, (ulong)(e.Duration.Ticks / 10));
        s.WriteByte((byte)e.Reason);
        TraceFormat.WriteString(s, e.Note);
        return s.ToArray();
    }

    public static TraceEnd DecodeEnd(ReadOnlySpan<byte> data, string where)
    {
        var c = new RecordCursor(data, where);
        var e = new TraceEnd
        {
            Intervals = c.Int(int.MaxValue, "interval count"),
            PageSpace = c.Int(MaxPageSpace, "page space"),
            Duration = TimeSpan.FromTicks((long)Math.Min(c.Varint(), (ulong)(TimeSpan.MaxValue.Ticks / 10)) * 10),
        };
        byte reason = c.Byte();
        if (reason > (byte)TraceEndReason.TargetExited) throw c.Bad($"has unknown end reason {reason}");
        e = e with { Reason = (TraceEndReason)reason, Note = c.String() };
        if (!c.AtEnd) throw c.Bad("has trailing bytes");
        return e;
    }
}
