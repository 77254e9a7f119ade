namespace LiveMig.Engine;

/// <summary>A deliberate stop with a reason: the peer refused or aborted, verification failed, recovery gave up.</summary>
internal sealed class MigrationAbort(string message) : Exception(message);
