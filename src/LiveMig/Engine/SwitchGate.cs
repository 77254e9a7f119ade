namespace LiveMig.Engine;

/// <summary>What a cancellation request came to, decided atomically with the switch-over.</summary>
public enum CancelOutcome
{
    /// <summary>Cancelled before the switch-over: the VM keeps running on the source (resumed if it was paused).</summary>
    Cancelled,
    /// <summary>The switch-over had begun (Commit sent or about to be): the migration goes on.</summary>
    TooLate,
    /// <summary>The migration had already ended.</summary>
    Ended,
}

/// <summary>
/// The one point where cancelling and committing meet: a cancellation either wins (the engine
/// will not send Commit, and fails the migration with the VM running on the source) or finds
/// the switch-over already begun — never both, so <c>livemig cancel</c> answers truthfully.
/// The engine asks <see cref="TryCommit"/> just before it sends Commit.
/// </summary>
public sealed class SwitchGate : IDisposable
{
    private const int Open = 0, CancelledState = 1, Committing = 2, EndedState = 3;
    private int _state;
    private readonly CancellationTokenSource _cancel = new();
    private CancellationTokenRegistration _external;

    /// <summary>Cancelled when a cancellation wins: the rounds stop at their next check.</summary>
    public CancellationToken Token => _cancel.Token;

    /// <summary>Lets an outside token (Ctrl-C, a caller's) cancel through the gate, with the same atomic rule.</summary>
    public void Follow(CancellationToken external) => _external = external.Register(() => TryCancel());

    public CancelOutcome TryCancel()
    {
        int was = Interlocked.CompareExchange(ref _state, CancelledState, Open);
        switch (was)
        {
            case Open or CancelledState:
                _cancel.Cancel();
                return CancelOutcome.Cancelled;
            case Committing:
                return CancelOutcome.TooLate;
            default:
                return CancelOutcome.Ended;
        }
    }

    /// <summary>Just before Commit: true when the switch-over may go ahead (no cancellation won), and from then on every cancellation is too late.</summary>
    public bool TryCommit() => Interlocked.CompareExchange(ref _state, Committing, Open) == Open;

    /// <summary>The migration ended (either way): later cancellations say so.</summary>
    public void End() => Interlocked.Exchange(ref _state, EndedState);

    /// <summary>The line <c>livemig cancel</c> prints.</summary>
    public static string Describe(CancelOutcome o) => o switch
    {
        CancelOutcome.Cancelled => "ok: cancelled before the switch-over; the VM keeps running on the source",
        CancelOutcome.TooLate => "too late: the switch-over has begun; the migration goes on (the VM runs, or is about to run, on the destination)",
        _ => "the migration has already ended",
    };

    public void Dispose()
    {
        _external.Dispose();
        _cancel.Dispose();
    }
}
