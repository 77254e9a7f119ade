using LiveMig.Policies;
using LiveMig.Vm;

namespace LiveMig.Engine;

/// <summary>A migration that may slow the guest needs a VM that has that brake: refused up front, never ignored.</summary>
internal static class BrakeCheck
{
    public static void Require(IVirtualMachine vm, PreCopyOptions o)
    {
        bool throttle = o.AutoConverge is not null || o.OnStall == StallAction.Throttle;
        if (throttle && (vm.Brakes & VmBrakes.Throttle) == 0)
            throw new ArgumentException($"VM {vm.Name} ({vm.Kind}) cannot throttle its vCPUs: auto-converge (or OnStall = Throttle) is not possible for it", nameof(o));
        if (o.DirtyLimit > 0 && (vm.Brakes & VmBrakes.DirtyLimit) == 0)
            throw new ArgumentException($"VM {vm.Name} ({vm.Kind}) cannot limit its dirty rate: DirtyLimit is not possible for it", nameof(o));
    }
}
