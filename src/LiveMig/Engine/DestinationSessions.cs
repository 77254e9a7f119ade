using System.Collections.Concurrent;

namespace LiveMig.Engine;

/// <summary>
/// The migrations in progress at one destination that a later connection may join by migration
/// id: pre-copy migrations waiting for their source to reattach (<see cref="PreCopyResumption"/>),
/// post-copy sessions taking their page-request and reopened main connections
/// (<see cref="PostCopyIncoming"/>), multi-stream migrations taking their data connections
/// (<see cref="IncomingStreams"/>). A <see cref="MigrationListener"/> owns one and hands it to
/// every <see cref="IncomingMigration"/> it starts, so a connection only ever joins a migration
/// of the listener it reached, and two listeners in one process know nothing of each other.
/// </summary>
public sealed class DestinationSessions
{
    internal ConcurrentDictionary<Guid, PreCopyResumption> Resumable { get; } = new();
    internal ConcurrentDictionary<Guid, PostCopyIncoming> PostCopy { get; } = new();
    internal ConcurrentDictionary<Guid, IncomingStreams> Streams { get; } = new();

    /// <summary>Migrations registered here now, of every kind (for tests and diagnostics).</summary>
    public int Count => Resumable.Count + PostCopy.Count + Streams.Count;

    /// <summary>Post-copy migrations here whose source is gone and that wait for it to recover (their VMs run with pages missing).</summary>
    public IReadOnlyList<Guid> WaitingForSource => [.. PostCopy.Where(kv => kv.Value.WaitingForSource).Select(kv => kv.Key)];

    /// <summary>
    /// An operator's decision: stop waiting for the source of post-copy migration
    /// <paramref name="migrationId"/> and discard its VM; the report says what was lost. False
    /// when no such migration is here.
    /// </summary>
    public bool DiscardPostCopy(Guid migrationId, string why) => PostCopy.TryGetValue(migrationId, out var s) && s.Discard(why);
}
