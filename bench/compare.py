"""Summarises bench/compare.sh's runs: for every table row (keyed by its first cells), the
median of each numeric cell per build, and B over A. Numbers are the first number in a cell
(a "12 (10–15)" spread counts as 12)."""
import re, statistics, sys
from pathlib import Path

folder, n = Path(sys.argv[1]), int(sys.argv[2])
num = re.compile(r"-?\d+(?:[.,]\d+)*")

def number(text):
    """The first number of a cell, or None (a version such as 6.18.44 is not a figure)."""
    m = num.match(text)
    if not m: return None
    try: return float(m.group())
    except ValueError: return None


def rows(path):
    header, table = None, {}
    for line in path.read_text().splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None or not any(num.match(c.replace(",", "")) for c in cells[1:]):
            header = cells
            continue
        key = " / ".join(c for c in cells if not num.match(c.replace(",", "").lstrip("`")))[:90] or cells[0]
        vals = {}
        for h, c in zip(header, cells):
            v = number(c.replace(",", ""))
            if v is not None: vals[h] = v
        table[key] = vals
    return table

runs = {side: [rows(folder / f"{side}.{i}.md") for i in range(1, n + 1)] for side in "AB"}
print(f"| row | figure | A median | B median | B/A |\n|---|---|---:|---:|---:|")
for key in runs["A"][0]:
    for fig in runs["A"][0][key]:
        a = [r[key][fig] for r in runs["A"] if key in r and fig in r[key]]
        b = [r[key][fig] for r in runs["B"] if key in r and fig in r[key]]
        if not a or not b: continue
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {key} | {fig} | {ma:g} | {mb:g} | {mb / ma:.2f} |" if ma else f"| {key} | {fig} | {ma:g} | {mb:g} | - |")
