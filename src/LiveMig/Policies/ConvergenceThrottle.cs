namespace LiveMig.Policies;

/// <summary>
/// Auto-converge settings, as QEMU's: when rounds do not converge, throttle the vCPUs to
/// <see cref="Initial"/>, then add <see cref="Increment"/> each time they still do not, up to
/// <see cref="Max"/> (cpu-throttle-initial 20, cpu-throttle-increment 10, max 99 percent).
/// </summary>
public sealed record AutoConvergeOptions
{
    public double Initial { get; init; } = 0.2;
    public double Increment { get; init; } = 0.1;
    public double Max { get; init; } = 0.99;
    /// <summary>A round is "not converging" when it ended with more dirty pages than this fraction of the pages it had to send (QEMU's throttle-trigger-threshold, 50%).</summary>
    public double TriggerThreshold { get; init; } = 0.5;
    /// <summary>Act after this many such rounds in a row (QEMU: 2 periods).</summary>
    public int TriggerRounds { get; init; } = 2;

    internal void Check()
    {
        if (!(Initial > 0 && Initial <= 0.99)) throw new ArgumentOutOfRangeException(nameof(Initial), Initial, "auto-converge initial throttle must be in (0, 0.99]");
        if (!(Increment >= 0 && Increment <= 0.99)) throw new ArgumentOutOfRangeException(nameof(Increment), Increment, "auto-converge increment must be in [0, 0.99]");
        if (!(Max >= Initial && Max <= 0.99)) throw new ArgumentOutOfRangeException(nameof(Max), Max, "auto-converge maximum must be in [initial, 0.99]");
        if (!(TriggerThreshold > 0)) throw new ArgumentOutOfRangeException(nameof(TriggerThreshold), TriggerThreshold, "must be positive");
        if (TriggerRounds < 1) throw new ArgumentOutOfRangeException(nameof(TriggerRounds), TriggerRounds, "must be at least 1");
    }
}

/// <summary>What the engine should do to the VM after a round (null fields: leave as is).</summary>
public readonly record struct ConvergenceAction(double? Throttle, double? DirtyLimit);

/// <summary>
/// Decides when and how hard to slow a guest whose rounds do not converge. A round does not
/// converge when the pages dirtied during it exceed <see cref="AutoConvergeOptions.TriggerThreshold"/>
/// of the pages it had to deal with (sent, skipped or deferred); after
/// <see cref="AutoConvergeOptions.TriggerRounds"/> such rounds in a row it escalates one step:
/// first the dirty limit, if one is configured (QEMU's dirty-limit), then CPU throttle steps if
/// auto-converge is on. Pure: statistics in, an action out.
/// </summary>
public sealed class ConvergenceThrottle
{
    private readonly AutoConvergeOptions? _auto;
    private readonly double _dirtyLimit;
    private readonly AutoConvergeOptions _trigger;
    private int _highRounds;

    /// <param name="autoConverge">CPU throttle steps; null for none.</param>
    /// <param name="dirtyLimit">Pages/s per vCPU to cap the guest at when it does not converge; 0 for none.</param>
    public ConvergenceThrottle(AutoConvergeOptions? autoConverge, double dirtyLimit)
    {
        autoConverge?.Check();
        if (!(dirtyLimit >= 0) || double.IsInfinity(dirtyLimit)) throw new ArgumentOutOfRangeException(nameof(dirtyLimit), dirtyLimit, "dirty limit must be a finite number of pages/s, 0 for none");
        _auto = autoConverge;
        _dirtyLimit = dirtyLimit;
        _trigger = autoConverge ?? new AutoConvergeOptions();
    }

    public bool Enabled => _auto is not null || _dirtyLimit > 0;
    /// <summary>The throttle asked for so far (0–0.99).</summary>
    public double Throttle { get; private set; }
    /// <summary>The dirty limit asked for so far (0 = none).</summary>
    public double DirtyLimit { get; private set; }
    public int Steps { get; private set; }

    /// <summary>True while another step is possible.</summary>
    public bool CanEscalate => (_dirtyLimit > 0 && DirtyLimit == 0) || (_auto is not null && (Throttle == 0 || (Throttle < _auto.Max && _auto.Increment > 0)));

    /// <summary>True when the last round did not converge and a step may follow: not the time to give up.</summary>
    public bool AboutToAct => CanEscalate && _highRounds > 0;

    /// <summary>Was this round one that did not converge?</summary>
    public bool NotConverging(RoundStats round)
    {
        long handled = round.PagesSent + round.PagesSkipped + round.PagesDeferred;
        long dirtied = round.PagesDirtied ?? round.DirtyPagesAfter;
        return dirtied > _trigger.TriggerThreshold * handled;
    }

    /// <summary>Looks at a finished round; returns the step to take now, if any.</summary>
    public ConvergenceAction? AfterRound(RoundStats round)
    {
        if (!Enabled) return null;
        _highRounds = NotConverging(round) ? _highRounds + 1 : 0;
        if (_highRounds < _trigger.TriggerRounds || !CanEscalate) return null;
        _highRounds = 0;
        Steps++;
        if (_dirtyLimit > 0 && DirtyLimit == 0)
        {
            DirtyLimit = _dirtyLimit;
            return new ConvergenceAction(null, DirtyLimit);
        }
        // Rounded so that 0.3 + 0.3 + 0.3 reaches a maximum of 0.9.
        Throttle = Throttle == 0 ? _auto!.Initial : Math.Min(_auto!.Max, Math.Round(Throttle + _auto.Increment, 9));
        return new ConvergenceAction(Throttle, null);
    }
}
