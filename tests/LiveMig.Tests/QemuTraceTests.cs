using LiveMig.Qemu;
using LiveMig.Traces;
using Xunit.Abstractions;

namespace LiveMig.Tests;

/// <summary>
/// The trace recorder on a whole QEMU guest's RAM (issue 14): the boot-sector guest rewrites every
/// page of a known range on each pass, many passes a second, so every interval must show that
/// range changed and next to nothing else; QEMU's own memory is not in the trace.
/// </summary>
[Trait("Category", "Qemu")]
public class QemuTraceTests(ITestOutputHelper output)
{
    [SkippableFact]
    public void The_recorder_sees_a_guest_rewrite_its_range_in_the_ram_file_and_nothing_of_qemu()
    {
        const int rangeMib = 24, ramMib = 64;
        string image = QemuGuest.Image(rangeMib);
        using var vm = QemuVm.Start("qemu-trace", QemuGuest.Spec(image, ramMib), QemuGuest.Host(QemuGuest.ImageDirectory()));
        var first = QemuGuest.WaitForReports(vm.SerialLog, 0, 2, TimeSpan.FromSeconds(60));

        var recorder = new TraceRecorder(vm.Process.Pid, new RecorderOptions { Interval = TimeSpan.FromMilliseconds(250), Duration = TimeSpan.FromSeconds(2.5), Mapping = vm.Process.RamFile });
        var ms = new MemoryStream();
        var run = Task.Run(() =>
        {
            using var w = new TraceWriter(ms, new TraceHeader());
            return recorder.Run(w, CancellationToken.None);
        });
        Assert.True(run.Wait(TimeSpan.FromSeconds(60)), "the recording did not end within 60 s");
        var result = run.Result;
        var last = QemuGuest.WaitForReports(vm.SerialLog, first.Passes, 1, TimeSpan.FromSeconds(60));
        var trace = TraceFile.Read(ms.ToArray());

        int rangePages = rangeMib << 8, ramPages = ramMib << 8;
        var counts = trace.Intervals.Skip(1).Select(iv => iv.Pages.Length).ToArray();
        output.WriteLine($"page space {result.PageSpace:N0} of {ramPages:N0} RAM pages; pages changed per interval: {string.Join(", ", counts)}; guest passes {first.Passes} → {last.Passes}");
        Assert.Equal(TraceEndReason.Completed, result.Reason);
        Assert.Equal(0, last.Errors);
        Assert.InRange(result.PageSpace, rangePages, ramPages); // the RAM file only: QEMU's heap and code would add thousands
        Assert.True(counts.Length >= 5, $"only {counts.Length} intervals");
        Assert.True(last.Passes - first.Passes >= counts.Length, $"the guest made {last.Passes - first.Passes} passes in {counts.Length} intervals: too slow for this check");
        // Never more than the range plus the few pages of the guest's own stack and serial output
        // (QEMU's own memory would add thousands), and the whole range in an interval that held a
        // whole pass — most of them, unless TCG was starved by a loaded machine for a while.
        foreach (int c in counts) Assert.InRange(c, 1, rangePages + 64);
        Assert.True(counts.Count(c => c >= rangePages) * 2 >= counts.Length, $"fewer than half the intervals saw the whole range: {string.Join(", ", counts)}");
        // One byte a page per pass (a few passes an interval): the content model must say "a few bytes changed".
        var changed = trace.Intervals.Skip(1).SelectMany(iv => iv.BytesChanged).Order().ToArray();
        Assert.True(changed[changed.Length / 2] <= 8, $"median bytes changed per page {changed[changed.Length / 2]}");
    }
}
