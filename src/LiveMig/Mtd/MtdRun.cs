using LiveMig.Simulation;
using LiveMig.Workloads;

namespace LiveMig.Mtd;

/// <summary>What one run of one defence configuration came to (times in virtual seconds).</summary>
public sealed record MtdRunResult
{
    public bool Compromised { get; init; }
    /// <summary>When the attack succeeded; null if it did not within the horizon.</summary>
    public double? CompromiseS { get; init; }
    /// <summary>Virtual time simulated: to the compromise, else the horizon.</summary>
    public double ElapsedS { get; init; }
    public int Moves { get; init; }
    public int FailedMoves { get; init; }
    /// <summary>Decisions to move not acted on: the victim was migrating already, or no host had room.</summary>
    public int SkippedMoves { get; init; }
    public long Bytes { get; init; }
    public double DowntimeMs { get; init; }
    public double DegradationS { get; init; }
    public double MigratingS { get; init; }
    public long Launches { get; init; }
    /// <summary>Co-residency episodes: attacker VMs that came up beside the victim.</summary>
    public int Episodes { get; init; }
    public int TrueAlarms { get; init; }
    public int FalseAlarms { get; init; }
}

/// <summary>
/// One run of the threat model against one defence, event by event on the simulator's
/// <see cref="EventScheduler"/>: the attacker's launches and co-residency checks, the attack's
/// clock, the detector's looks, the policy's decisions and each move's migration, whose length and
/// cost come from the <see cref="MoveCostModel"/> (the simulator's migration of the victim). The
/// victim is co-resident with an attacker VM from the moment that VM is up on its host until the
/// move that takes it away completes (it runs on the source throughout the migration, as in pre-copy).
/// Seeded: the attacker and detector draw from their own streams, so every configuration of a
/// sweep meets the same attacker in run i.
/// </summary>
public sealed class MtdRun
{
    private sealed class AttackerVm(int host)
    {
        public int Host { get; } = host;
        public bool Up { get; set; }
        public bool Alive { get; set; } = true;
        public long Episode { get; set; } = -1;
    }

    private readonly MtdScenario _s;
    private readonly PolicySpec _policy;
    private readonly MoveCostModel _costs;
    private readonly EventScheduler _scheduler = new();
    private readonly int[] _load;
    private readonly List<AttackerVm> _attackers = [];
    private readonly List<(int Host, double At)> _suspects = [];
    private Xoshiro256 _attackRng, _detectRng, _policyRng, _placeRng;
    private int _victimHost;
    private bool _migrating, _over;
    private double? _compromiseS;
    private int _moves, _failed, _skipped, _episodes, _trueAlarms, _falseAlarms;
    private long _bytes, _launches;
    private double _downtimeMs, _degradationS, _migratingS;
    private double _lastDecisionS;

    public MtdRun(MtdScenario scenario, PolicySpec policy, MoveCostModel costs, ulong runSeed)
    {
        _s = scenario;
        _policy = policy;
        _costs = costs;
        ulong mix = runSeed;
        _placeRng = new Xoshiro256(Xoshiro256.SplitMix(ref mix));
        _attackRng = new Xoshiro256(Xoshiro256.SplitMix(ref mix));
        _detectRng = new Xoshiro256(Xoshiro256.SplitMix(ref mix));
        _policyRng = new Xoshiro256(Xoshiro256.SplitMix(ref mix));
        _load = new int[scenario.Cloud.Hosts];
    }

    private double Now => _scheduler.NowSeconds;
    private CloudSpec Cloud => _s.Cloud;

    public MtdRunResult Run()
    {
        PlaceBackground();
        _victimHost = Place(ref _placeRng) ?? throw new InvalidOperationException("no slot for the victim");
        _load[_victimHost]++;
        _scheduler.At(EventScheduler.Nanoseconds(_s.Attacker.Start), Launch);
        if (_s.Detector is { } d) _scheduler.After(d.CheckEvery, Detect);
        StartPolicy();
        long horizon = EventScheduler.Nanoseconds(_s.Horizon);
        // One event at a time, so that a compromise ends the run at once.
        while (!_over && _scheduler.Run(until: horizon, maxEvents: 1) > 0) { }
        double elapsed = _compromiseS ?? _s.Horizon.TotalSeconds;
        return new MtdRunResult
        {
            Compromised = _compromiseS is not null, CompromiseS = _compromiseS, ElapsedS = elapsed,
            Moves = _moves, FailedMoves = _failed, SkippedMoves = _skipped, Bytes = _bytes, DowntimeMs = _downtimeMs,
            DegradationS = _degradationS, MigratingS = _migratingS, Launches = _launches, Episodes = _episodes,
            TrueAlarms = _trueAlarms, FalseAlarms = _falseAlarms,
        };
    }

    // ---- the cloud ----

    private void PlaceBackground()
    {
        long benign = MtdScenarioReader.BenignVms(Cloud);
        for (long i = 0; i < benign; i++)
            if (Place(ref _placeRng) is { } h) _load[h]++;
    }

    /// <summary>A host for a new VM by the cloud's placement policy; null when every host is full.</summary>
    private int? Place(ref Xoshiro256 rng)
    {
        int slots = Cloud.Slots;
        switch (Cloud.Placement)
        {
            case Placement.Pack:
                for (int h = 0; h < _load.Length; h++) if (_load[h] < slots) return h;
                return null;
            case Placement.LeastLoaded:
                return Least(Enumerable.Range(0, _load.Length).Where(h => _load[h] < slots), ref rng);
            default:
                return PickUniform(Enumerable.Range(0, _load.Length).Where(h => _load[h] < slots), ref rng);
        }
    }

    private int? Least(IEnumerable<int> hosts, ref Xoshiro256 rng)
    {
        var list = hosts.ToList();
        if (list.Count == 0) return null;
        int min = list.Min(h => _load[h]);
        return PickUniform(list.Where(h => _load[h] == min), ref rng);
    }

    private static int? PickUniform(IEnumerable<int> hosts, ref Xoshiro256 rng)
    {
        var list = hosts as IList<int> ?? hosts.ToList();
        return list.Count == 0 ? null : list[(int)rng.NextBelow(list.Count)];
    }

    private double Exponential(ref Xoshiro256 rng, double mean) => -mean * Math.Log(1 - rng.NextDouble());

    // ---- the attacker ----

    private void Launch()
    {
        var a = _s.Attacker;
        if (_launches >= a.MaxLaunches) return; // the budget is spent: no more launches, ever
        if (_attackers.Count(v => v.Alive) < a.MaxVms && Place(ref _attackRng) is { } host)
        {
            _launches++;
            _load[host]++;
            var vm = new AttackerVm(host);
            _attackers.Add(vm);
            _scheduler.After(a.LaunchTime, () => Up(vm));
        }
        _attackers.RemoveAll(v => !v.Alive);
        double next = a.PoissonLaunches ? Exponential(ref _attackRng, a.LaunchEvery.TotalSeconds) : a.LaunchEvery.TotalSeconds;
        _scheduler.AfterSeconds(next, Launch);
    }

    /// <summary>The attacker's VM is up and checks where it is: beside the victim it attacks, elsewhere it is given back.</summary>
    private void Up(AttackerVm vm)
    {
        vm.Up = true;
        if (vm.Host == _victimHost) StartEpisode(vm);
        else Terminate(vm);
    }

    private void StartEpisode(AttackerVm vm)
    {
        _episodes++;
        vm.Episode = _scheduler.After(_s.Attacker.AttackTime, () => Compromise());
    }

    private void Compromise()
    {
        _compromiseS = Now;
        _over = true;
    }

    private void Terminate(AttackerVm vm)
    {
        if (vm.Episode >= 0) _scheduler.Cancel(vm.Episode);
        vm.Episode = -1;
        vm.Alive = false;
        _load[vm.Host]--;
    }

    // ---- the detector ----

    private void Detect()
    {
        var d = _s.Detector!;
        _scheduler.After(d.CheckEvery, Detect);
        var present = _attackers.Where(v => v.Alive && v.Up && v.Host == _victimHost).ToList();
        bool alarm = _detectRng.NextDouble() < (present.Count > 0 ? d.TruePositive : d.FalsePositive);
        if (!alarm) return;
        if (present.Count > 0) _trueAlarms++;
        else _falseAlarms++;
        // It flags the host it looked at: an attacker-aware move keeps away from it (and its rack) for a while.
        _suspects.Add((_victimHost, Now));
        if (_policy.Kind == PolicyKind.Threat) TryMove();
    }

    // ---- the defence ----

    private void StartPolicy()
    {
        switch (_policy.Kind)
        {
            case PolicyKind.Periodic:
                _scheduler.After(_policy.Interval, Periodic);
                break;
            case PolicyKind.Poisson:
                _scheduler.AfterSeconds(Exponential(ref _policyRng, _policy.Interval.TotalSeconds), Poisson);
                break;
            case PolicyKind.CostAware:
                _scheduler.After(_policy.CheckEvery, CostAwareCheck);
                break;
        }
    }

    private void Periodic()
    {
        _scheduler.After(_policy.Interval, Periodic);
        TryMove();
    }

    private void Poisson()
    {
        _scheduler.AfterSeconds(Exponential(ref _policyRng, _policy.Interval.TotalSeconds), Poisson);
        TryMove();
    }

    /// <summary>
    /// Cost-aware: from the shortest interval on, move at the first look at which the migration
    /// model prices the move within the margin of the cheapest moment of the workload's cycle;
    /// at the longest interval, move whatever it costs (the looks fall on a grid of their own,
    /// the deadline is exact).
    /// </summary>
    private void CostAwareCheck()
    {
        double since = Now - _lastDecisionS, max = _policy.Interval.TotalSeconds;
        double next = Math.Min(_policy.CheckEvery.TotalSeconds, max - since);
        if (since >= max - 1e-9)
        {
            TryMove();
            next = _policy.CheckEvery.TotalSeconds;
        }
        else if (since >= _policy.MinInterval.TotalSeconds && Cheap())
        {
            TryMove();
            next = Math.Min(_policy.CheckEvery.TotalSeconds, max);
        }
        _scheduler.AfterSeconds(next, CostAwareCheck);
    }

    private bool Cheap()
    {
        var link = Cloud.Link; // the predictor's view: the workload's state is what varies
        double cheapest = _costs.Cheapest(link, _policy.CheapBy);
        return _costs.At(Now, link).Metric(_policy.CheapBy) <= cheapest * (1 + _policy.CheapWithin) + 1e-12;
    }

    /// <summary>A decision to move: the migration starts now unless one runs or no host has room.</summary>
    private void TryMove()
    {
        _lastDecisionS = Now;
        if (_migrating || Destination() is not { } dest)
        {
            _skipped++;
            return;
        }
        var cost = _costs.At(Now, LinkBetween(_victimHost, dest));
        _migrating = true;
        _load[dest]++; // the destination's slot is taken from the start
        int from = _victimHost;
        _scheduler.AfterSeconds(cost.TotalS, () => Moved(from, dest, cost));
    }

    private LinkModel LinkBetween(int a, int b) => Cloud.CrossRackLink is { } x && Cloud.RackOf(a) != Cloud.RackOf(b) ? x : Cloud.Link;

    private void Moved(int from, int dest, MoveCost cost)
    {
        _migrating = false;
        _bytes += cost.Bytes;
        _degradationS += cost.DegradationS;
        _migratingS += cost.TotalS;
        if (!cost.Completed)
        {
            _failed++;
            _load[dest]--;
            return;
        }
        _moves++;
        _downtimeMs += cost.DowntimeMs;
        _load[from]--;
        _victimHost = dest;
        // The attacker sees the victim gone and gives its VMs there back; any up where it arrives attack it now.
        foreach (var vm in _attackers.Where(v => v.Alive && v.Up).ToList())
        {
            if (vm.Host == from) Terminate(vm);
            else if (vm.Host == dest && vm.Episode < 0) StartEpisode(vm);
        }
    }

    private int? Destination()
    {
        var candidates = Enumerable.Range(0, _load.Length).Where(h => h != _victimHost && _load[h] < Cloud.Slots).ToList();
        if (candidates.Count == 0) return null;
        return _policy.Destination switch
        {
            DestinationChoice.LeastLoaded => Least(candidates, ref _policyRng),
            DestinationChoice.AttackerAware => FarFromSuspects(candidates),
            _ => PickUniform(candidates, ref _policyRng),
        };
    }

    /// <summary>The candidates farthest from every host flagged lately (another rack, then another host), then the least loaded of them.</summary>
    private int? FarFromSuspects(List<int> candidates)
    {
        double memory = _s.Detector?.Memory.TotalSeconds ?? 0;
        _suspects.RemoveAll(s => Now - s.At > memory);
        if (_suspects.Count == 0) return Least(candidates, ref _policyRng);
        int Distance(int h) => _suspects.Min(s => s.Host == h ? 0 : Cloud.RackOf(s.Host) == Cloud.RackOf(h) ? 1 : 2);
        int best = candidates.Max(Distance);
        return Least(candidates.Where(h => Distance(h) == best), ref _policyRng);
    }
}
