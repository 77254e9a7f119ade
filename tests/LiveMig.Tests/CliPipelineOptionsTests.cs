using System.CommandLine;
using LiveMig.Cli;
using LiveMig.Engine;
using LiveMig.Pipeline;

namespace LiveMig.Tests;

/// <summary>The pipeline options as the CLI parses them (in process; the process-level checks are in CliProcessTests).</summary>
public class CliPipelineOptionsTests
{
    private static MigrationOptions Parse(params string[] args)
    {
        var o = new CliOptions();
        var cmd = new Command("demo");
        o.AddMigrationOptions(cmd);
        var r = cmd.Parse(args);
        Assert.Empty(r.Errors);
        return o.MigrationOptions(r);
    }

    [Fact]
    public void Cli_pipeline_defaults_to_none()
    {
        Assert.True(Parse().Pipeline.IsBaseline);
        Assert.Equal("none", Parse().Pipeline.ToString());
    }

    [Theory]
    [InlineData("lz4", CompressionKind.Lz4, null)]
    [InlineData("lz4:9", CompressionKind.Lz4, 9)]
    [InlineData("zstd", CompressionKind.Zstd, null)]
    [InlineData("ZSTD:-3", CompressionKind.Zstd, -3)]
    [InlineData("adaptive", CompressionKind.Adaptive, null)]
    [InlineData("none", CompressionKind.None, null)]
    public void Cli_compress_modes_and_levels(string text, CompressionKind kind, int? level)
    {
        var p = Parse("--compress", text).Pipeline;
        Assert.Equal(kind, p.Compression);
        Assert.Equal(level, p.CompressionLevel);
    }

    [Fact]
    public void Cli_each_stage_flag_and_optimize_all_with_explicit_overrides()
    {
        Assert.Equal(64L << 20, Parse("--xbzrle-cache", "64MiB").Pipeline.XbzrleCacheBytes);
        Assert.Equal(0, Parse("--xbzrle-cache", "off").Pipeline.XbzrleCacheBytes);
        Assert.True(Parse("--dedup").Pipeline.Dedup);
        Assert.True(Parse("--skip-free-pages").Pipeline.SkipFreePages);

        Assert.Equal(PipelineOptions.All, Parse("--optimize", "all").Pipeline);
        var p = Parse("--optimize", "all", "--compress", "lz4:3", "--dedup", "false", "--xbzrle-cache", "8MiB");
        Assert.Equal(PipelineOptions.All with { Compression = CompressionKind.Lz4, CompressionLevel = 3, Dedup = false, XbzrleCacheBytes = 8L << 20 }, p.Pipeline);
        Assert.Equal(new PipelineOptions { Dedup = true, SkipFreePages = true }, Parse("--optimize", "dedup,free-pages").Pipeline);
    }

    [Theory]
    [InlineData("--compress", "gzip", "--compress 'gzip': expected none, lz4[:LEVEL], zstd[:LEVEL] or adaptive")]
    [InlineData("--compress", "lz4:13", "--compress 'lz4:13': LZ4 level 13 is out of range (0..12)")]
    [InlineData("--compress", "zstd:x", "--compress 'zstd:x': level 'x' is not a whole number")]
    [InlineData("--xbzrle-cache", "12", "--xbzrle-cache '12': at least one page (4KiB), or 0 for off")]
    [InlineData("--optimize", "all,turbo", "--optimize 'all,turbo': unknown optimisation 'all'")]
    [InlineData("--optimize", "turbo", "unknown optimisation 'turbo' (known: all, none, compress, xbzrle, dedup, free-pages)")]
    public void Cli_bad_pipeline_options_name_the_option(string option, string value, string expected)
    {
        var e = Assert.Throws<UsageException>(() => Parse(option, value));
        Assert.Contains(expected, e.Message);
    }
}

/// <summary>--streams as the CLI parses it.</summary>
public class CliStreamsOptionTests
{
    private static MigrationOptions Parse(params string[] args)
    {
        var o = new CliOptions();
        var cmd = new Command("demo");
        o.AddMigrationOptions(cmd);
        var r = cmd.Parse(args);
        Assert.Empty(r.Errors);
        return o.MigrationOptions(r);
    }

    [Fact]
    public void Cli_streams_defaults_to_one_and_takes_a_count()
    {
        Assert.Equal(1, Parse().Streams);
        Assert.Equal(4, Parse("--streams", "4").Streams);
    }

    [Theory]
    [InlineData("--streams 0", "--streams 0: must be between 1 and 16")]
    [InlineData("--streams 17", "--streams 17: must be between 1 and 16")]
    [InlineData("--streams 2 --strategy postcopy", "--streams 2: not with --strategy postcopy: only pre-copy sends on several streams; postcopy uses one connection")]
    [InlineData("--streams 2 --strategy hybrid", "--streams 2: not with --strategy hybrid: only pre-copy sends on several streams; hybrid uses one connection")]
    public void Cli_streams_out_of_range_or_with_post_copy_is_refused_in_one_line(string args, string error)
    {
        var e = Assert.Throws<UsageException>(() => Parse(args.Split(' ')));
        Assert.StartsWith(error, e.Message);
    }
}
