using System.Collections.Concurrent;
using System.Reflection;
using System.Runtime.CompilerServices;
using LiveMig.Memory;
using LiveMig.Pipeline;
using LiveMig.Protocol;
using LiveMig.Reporting;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>
/// Compiles ahead, on a background thread, the code the switch-over runs for the first time
/// (saving and restoring the VM state, the Prepare/Ready/Commit messages, hash combining, the
/// resume, the endpoint hand-over, the report): measured on this machine, first-call JIT put
/// 4–8 ms into each side's downtime. Started when a migration begins, it runs while round 0 is
/// on the wire. A real hypervisor runs precompiled code; this is the managed equivalent of
/// having it resident. Each type is prepared once per process.
/// </summary>
internal static class SwitchoverWarmup
{
    private static readonly ConcurrentDictionary<Type, bool> Prepared = new();

    /// <summary>
    /// Types of the switch-over path: <paramref name="extra"/> (the VM's own: its kind's factory
    /// names them on the destination), the switch-over messages, the hashes, the report, the page pipeline.
    /// </summary>
    private static IEnumerable<Type> SwitchoverTypes(IEnumerable<Type> extra)
    {
        foreach (var t in extra) yield return t;
        yield return typeof(RoundStartMessage);
        yield return typeof(RoundEndMessage);
        yield return typeof(PrepareMessage);
        yield return typeof(ReadyMessage);
        yield return typeof(ErrorMessage);
        yield return typeof(SpanWriter);
        yield return typeof(SpanReader);
        yield return typeof(PageHashes);
        yield return typeof(PhaseClock);
        yield return typeof(DowntimePhase);
        yield return typeof(DowntimeBreakdown);
        yield return typeof(RoundReport);
        yield return typeof(WireBytes);
        yield return typeof(MigrationReport);
        // Last (the restore path above matters more): the page pipeline, whose stages may run for the
        // first time in the stop-and-copy (XBZRLE deltas start in round 1, which can be the final round).
        foreach (var t in typeof(PageBatchWriter).Assembly.GetTypes())
            if (t.Namespace == typeof(PageBatchWriter).Namespace) yield return t;
    }

    /// <summary>Compiler-generated members of records that the switch-over never calls (and that are large).</summary>
    private static readonly string[] Skipped = ["ToString", "PrintMembers", "Equals", "GetHashCode", "<Clone>$", "Deconstruct", "op_Equality", "op_Inequality", "get_EqualityContract"];

    /// <summary>For the destination: the restore (the types of the arriving VM's kind), resume and report code.</summary>
    public static Task ForDestination(IVmFactory factory) =>
        Start(null, [typeof(IncomingMigration), typeof(DestinationOptions), typeof(DestinationReport), typeof(VmStateAssembler), factory.GetType(), .. factory.SwitchoverTypes]);

    /// <summary>
    /// For a destination that may switch to post-copy: also the demand pagers, the post-copy
    /// messages and the session (measured: 20–30 ms of first-call JIT in the switch otherwise).
    /// </summary>
    public static Task ForPostCopyDestination(IVmFactory factory) =>
        Start(null, [typeof(PostCopyIncoming), typeof(DemandPager), typeof(UffdDemandPager), typeof(PortableDemandPager), typeof(NativePageBitmap),
            typeof(PageBitmapChunks), typeof(PostCopyStartMessage), typeof(LatencyRecorder), typeof(IncomingMigration), typeof(DestinationOptions),
            typeof(DestinationReport), typeof(VmStateAssembler), factory.GetType(), .. factory.SwitchoverTypes]);

    /// <summary>
    /// For a post-copy or hybrid source: the switch (pending set, PostCopyStart, bitmap chunks,
    /// state, the request server, the push) and the VM's own warm-up; waited for before the pause.
    /// </summary>
    public static Task ForPostCopySource(IVirtualMachine vm) =>
        Start(vm.WarmSwitchover, [typeof(PostCopyMigration), typeof(NativePageBitmap), typeof(PageBitmapChunks), typeof(PostCopyStartMessage), typeof(VmStateChunks),
            typeof(Policies.PrepagingOrder), typeof(LatencyRecorder), typeof(Core.RoundController), typeof(ConnectionRoundSender), typeof(SourceReport), typeof(StopAndCopy), vm.GetType(), vm.DirtyLog.GetType()]);

    /// <summary>Starts compiling the switch-over code (plus <paramref name="extra"/> types) after running <paramref name="more"/>; the task ends when done.</summary>
    private static Task Start(Action? more, IEnumerable<Type> extra) =>
        Task.Factory.StartNew(() =>
        {
            // Framework code used through generic instantiations (the memory hash of the Prepare message).
            new PageHashes(65536).Combine();
            more?.Invoke();
            foreach (var t in SwitchoverTypes(extra)) Prepare(t);
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    /// <summary>
    /// For the source: the VM's own types (the VM, its dirty log) too, and the VM's own warm-up
    /// (<see cref="IVirtualMachine.WarmSwitchover"/>: the built-in VM saves its state once into
    /// nowhere). Interface calls the migration thread makes at the pause (the
    /// brakes' release) are warmed by <see cref="WarmBrakes"/> on that thread.
    /// </summary>
    public static Task ForSource(IVirtualMachine vm) =>
        Start(vm.WarmSwitchover, [typeof(PreCopyMigration), typeof(Core.ThrottleMeter), typeof(Core.RoundController), typeof(ConnectionRoundSender), typeof(SourceReport), typeof(StopAndCopy), vm.GetType(), vm.DirtyLog.GetType()]);

    /// <summary>
    /// Calls the brakes with the values in force (no change, so no effect), and SaveState (which a
    /// running VM refuses; a paused one just returns its state): a prepared method
    /// reached through an interface was still compiled again at its first call in our
    /// measurements, so these run once for real before the pause. Call on the migration thread.
    /// </summary>
    public static void WarmBrakes(IVirtualMachine vm)
    {
        vm.Throttle(vm.ThrottleFraction);
        vm.LimitDirtyRate(vm.DirtyRateLimit);
        try { vm.SaveState(); } catch (InvalidOperationException) { } // refused while running, but compiled
    }

    /// <summary>Compiles every non-generic method and constructor declared by <paramref name="type"/> (not its nested types' twice).</summary>
    internal static int Prepare(Type type)
    {
        if (type.ContainsGenericParameters || !Prepared.TryAdd(type, true)) return 0;
        int n = 0;
        const BindingFlags all = BindingFlags.DeclaredOnly | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance | BindingFlags.Static;
        foreach (var m in type.GetMethods(all).Cast<MethodBase>().Concat(type.GetConstructors(all)))
        {
            if (m.IsAbstract || m.ContainsGenericParameters || Array.IndexOf(Skipped, m.Name) >= 0 || m.GetMethodBody() is null) continue;
            try
            {
                RuntimeHelpers.PrepareMethod(m.MethodHandle);
                n++;
            }
            catch (Exception e) when (e is ArgumentException or NotSupportedException or InvalidOperationException or BadImageFormatException or TypeLoadException) { }
        }
        foreach (var nested in type.GetNestedTypes(BindingFlags.Public | BindingFlags.NonPublic)) n += Prepare(nested);
        return n;
    }
}
