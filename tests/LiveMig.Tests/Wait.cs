using System.Runtime.CompilerServices;

namespace LiveMig.Tests;

/// <summary>
/// A bounded wait for a condition another thread brings about: the test fails, naming the
/// condition, rather than hanging when it never comes (every wait in a test has a bound).
/// </summary>
internal static class Wait
{
    /// <summary>Generous for a loaded 2-core machine; a healthy run meets these conditions in milliseconds.</summary>
    public static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    public static void Until(Func<bool> condition, [CallerArgumentExpression(nameof(condition))] string? what = null) =>
        Assert.True(SpinWait.SpinUntil(condition, Bound), $"not within {Bound.TotalSeconds:0} s: {what}");
}
