#!/usr/bin/env python3
"""Per-phase downtime (the reports' downtimeBreakdown), median over runs, per workload and stages.

    bench/downtime.py DIR [FILTER]     DIR as kept by OUT=DIR bench/stages.sh; FILTER e.g. "kv-"
Prints a Markdown table: downtime, then each source step, the destination's restore and the
time from the VM's resume until a vCPU ran, all in ms (median of the runs of each cell).
"""
import glob, json, os, statistics, sys
from collections import defaultdict

def main():
    d = sys.argv[1]
    flt = sys.argv[2] if len(sys.argv) > 2 else ""
    cells = defaultdict(list)
    for f in sorted(glob.glob(os.path.join(d, "*.json"))):
        name = os.path.basename(f)
        if flt not in name:
            continue
        try:
            r = json.load(open(f))
        except (ValueError, OSError):
            continue
        if r.get("outcome") != "completed" or not r.get("downtimeBreakdown"):
            continue
        cells[name.rsplit("-", 1)[0]].append(r)
    src_phases = ["release-brakes", "final-harvest", "final-round", "observer", "save-state", "send-vm-state", "hash-combine", "prepare-to-ready", "commit-to-resumed"]
    head = ["cell", "runs", "downtime", "pause barrier*"] + src_phases + ["dst restore", "dst final-round", "vCPU wake*", "JIT src/dst"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 2 + "---:|" * (len(head) - 2))
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    for cell, rs in cells.items():
        def phase(r, side, p):
            return sum(x["ms"] for x in r["downtimeBreakdown"].get(side, []) if x["phase"] == p)
        row = [cell, str(len(rs)), f'{med([r["downtimeMs"] for r in rs]):.1f}', f'{med([r["downtimeBreakdown"]["pauseBarrierMs"] for r in rs]):.2f}']
        row += [f"{med([phase(r, 'source', p) for r in rs]):.2f}" for p in src_phases]
        row.append(f"{med([phase(r, 'destination', 'restore') for r in rs]):.2f}")
        row.append(f"{med([phase(r, 'destination', 'final-round') for r in rs]):.2f}")
        wakes = [r["downtimeBreakdown"]["vcpuWakeMs"] for r in rs if r["downtimeBreakdown"].get("vcpuWakeMs") is not None]
        row.append(f"{med(wakes):.2f}")
        row.append(f'{med([r["downtimeBreakdown"]["sourceJitMs"] for r in rs]):.1f}/{med([r["downtimeBreakdown"]["destinationJitMs"] for r in rs]):.1f}')
        print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    main()
