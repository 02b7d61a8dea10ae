"""bn.csv -> bn.md (speedups over torch, % of the run's copy bandwidth, the targets, and
beside each backend's time over the floor the static check's estimate of it,
bench/results/static/sm90.csv and csrc_sm90.csv) and bn.png (speedup over torch per shape).

    python bench/report.py bench/results/h100/bn.csv

Only the rows of the newest run in the file are used (the last commit + device that appended
rows), so an appended-to CSV keeps its history without mixing runs.
"""
from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

# The benchmark issue's targets, checked against the torch provider.
TARGET_GEOMEAN = {"fwd_train": 1.3, "bwd": 1.3, "fwd_eval": 1.0}
TARGET_WORST = 0.95
TARGET_BANDWIDTH = 0.85
LARGE_BYTES = 64 * 2**20
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
OURS = ("bnkernels_triton", "bnkernels_cuda")  # the providers the targets are for


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def load_last_run(path: Path):
    with path.open() as f:
        rows = list(csv.DictReader(f))
    last = (rows[-1]["commit"], rows[-1]["gpu"])
    # the newest run: the trailing rows with the last (commit, gpu)
    run = []
    for row in reversed(rows):
        if (row["commit"], row["gpu"]) != last:
            break
        run.append(row)
    return list(reversed(run))


def summarize(rows):
    """{(op, dtype, layout): {shape: {provider: (median_ms, GB/s, launches)}}} and the copy
    GB/s (launches: "" where the run did not count them)."""
    copy_gbps = next(float(r["gbps"]) for r in rows if r["op"] == "copy")
    table = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["op"] == "copy":
            continue
        shape = (int(r["N"]), int(r["C"]), int(r["H"]), int(r["W"]))
        table[(r["op"], r["dtype"], r["layout"])][shape][r["provider"]] = (
            float(r["median_ms"]), float(r["gbps"]), r.get("launches", ""))
    return table, copy_gbps


STATIC_DIR = Path(__file__).resolve().parent / "results" / "static"
# Each backend's static check (static_check.py, static_check_csrc.py)
STATIC = {"bnkernels_triton": STATIC_DIR / "sm90.csv",
          "bnkernels_triton_3k": STATIC_DIR / "sm90.csv",
          "bnkernels_cuda": STATIC_DIR / "csrc_sm90.csv"}


def _modelled(provider: str, op: str, launches: str) -> bool:
    """Whether the static table models what the row ran: sm90.csv models the Triton
    backend's three-kernel passes, not its one-launch training pass (a training op that
    ran as 1 launch: backends/triton/persistent.py)."""
    persistent = (provider.startswith("bnkernels_triton") and launches == "1"
                  and (op.endswith("bwd") or op.endswith("fwd_train")))
    return not persistent


def load_estimates(paths: dict = STATIC) -> dict:
    """{provider: {(op, dtype, layout, N, C, H, W): the static check's estimate (time over
    the bandwidth floor) of the pass}}; a provider without a table is left out."""
    estimates = {}
    for provider, path in paths.items():
        if path.exists():
            with path.open() as f:
                estimates[provider] = {
                    (r["pass"], r["dtype"], r["layout"], int(r["N"]), int(r["C"]), int(r["H"]),
                     int(r["W"])): float(r["est_ratio"])
                    for r in csv.DictReader(f) if r["kernel"] == "all"}
    return estimates


def markdown(rows, estimates=None) -> str:
    """estimates (load_estimates): shown beside each backend's measured time over the
    floor (the run's copy bandwidth), so that the static model is checked too."""
    estimates = load_estimates() if estimates is None else estimates
    table, copy_gbps = summarize(rows)
    meta = rows[0]
    out = [f"# BatchNorm benchmark: {meta['gpu']}",
           "",
           f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
           f"commit {meta['commit']}. Copy bandwidth of this run: {copy_gbps:.0f} GB/s.",
           "Speedup = torch median / provider median; % copy = the provider's GB/s (3 tensor "
           "sizes for fwd_train, 5 for bwd, 2 for fwd_eval) over the copy's; launches: device "
           "kernels per call. A training pass that ran as 1 launch (the Triton backend's "
           "persistent pass) moves 2 (fwd) or 3 (bwd) sizes, so its % copy can pass 100; the "
           "static estimates model the three kernels, so it has none.", ""]
    verdicts = []
    for (op, dtype, layout), shapes in sorted(table.items()):
        providers = sorted({p for by_provider in shapes.values() for p in by_provider})
        static = [p for p in providers if any((op, dtype, layout, *shape) in
                                              estimates.get(p, {}) for shape in shapes)]
        out += [f"## {op} {dtype} {layout}", "",
                "| N,C,H,W | " + " | ".join(f"{p} ms (x, %copy)" for p in providers) +
                "".join(f" | {p.split('_')[-1]} x floor: static estimate / measured"
                        for p in static) + " |",
                "|---|" + "---|" * (len(providers) + len(static))]
        speedups = defaultdict(list)
        for shape, by_provider in sorted(shapes.items(), key=lambda kv: -kv[0][1] * kv[0][2]):
            base = by_provider["torch"][0]
            cells = []
            for p in providers:
                ms, gbps, launches = by_provider[p]
                speedups[p].append(base / ms)
                counted = (f", {launches} launch" + ("" if launches == "1" else "es")
                           if launches else "")
                cells.append(f"{ms:.3f} ({base / ms:.2f}x, {100 * gbps / copy_gbps:.0f}%"
                             f"{counted})")
            for p in static:
                est = estimates[p].get((op, dtype, layout, *shape))
                if not _modelled(p, op, by_provider[p][2]):
                    est = None
                measured = copy_gbps / by_provider[p][1]
                cells.append(f"{est:.2f} / {measured:.2f}" if est else f"- / {measured:.2f}")
            out.append(f"| {','.join(map(str, shape))} | " + " | ".join(cells) + " |")
        out.append("| geomean speedup | " + " | ".join(
            f"{_geomean(speedups[p]):.2f}x" for p in providers) + " |")
        out.append("")
        for name in OURS:
            ours = speedups.get(name)
            if not ours or op not in TARGET_GEOMEAN:  # the fused ops have no target of their own
                continue
            ok = (_geomean(ours) >= TARGET_GEOMEAN[op] and min(ours) >= TARGET_WORST and
                  ("inductor" not in speedups or _geomean(ours) >= _geomean(speedups["inductor"])))
            verdicts.append(f"- {name} {op} {dtype} {layout}: geomean {_geomean(ours):.2f}x "
                            f"(target {TARGET_GEOMEAN[op]}x), worst {min(ours):.2f}x: "
                            f"{'meets' if ok else 'MISSES'} the target")
    large = [(r, float(r["gbps"]) / copy_gbps) for r in rows
             if r["op"] != "copy" and r["provider"] in OURS
             and int(r["N"]) * int(r["C"]) * int(r["H"]) * int(r["W"]) * ELEMENT_SIZE[r["dtype"]]
             >= LARGE_BYTES]
    below = [f"{r['provider']} {r['op']} {r['dtype']} {r['layout']} C={r['C']} "
             f"{r['H']}x{r['W']}: {100 * f:.0f}%" for r, f in large if f < TARGET_BANDWIDTH]
    out += ["## Targets", ""] + verdicts + [
        f"- tensors >= 64 MB at >= {100 * TARGET_BANDWIDTH:.0f}% of copy bandwidth: "
        + ("all" if not below else f"{len(below)} of {len(large)} below: " + "; ".join(below))]
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table, _ = summarize(rows)
    groups = sorted(table)
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 2.6 * len(groups)), squeeze=False)
    for ax, key in zip(axes[:, 0], groups):
        shapes = sorted(table[key], key=lambda s: -s[1] * s[2])
        providers = [p for p in sorted({p for s in shapes for p in table[key][s]}) if p != "torch"]
        width = 0.8 / max(1, len(providers))
        for i, p in enumerate(providers):
            ys = [table[key][s]["torch"][0] / table[key][s][p][0] for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"{s[1]}x{s[2]}x{s[3]}" for s in shapes], fontsize=7)
        ax.set_ylabel("speedup vs torch")
        ax.set_title(" ".join(key), fontsize=9)
        ax.legend(fontsize=7, ncol=len(providers))
    meta = rows[0]
    fig.suptitle(f"BatchNorm, N={meta['N'] if meta['op'] != 'copy' else rows[1]['N']}, "
                 f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"commit {meta['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    csv_path = Path(argv[0]) if argv else Path(__file__).resolve().parent / "results" / "h100" / "bn.csv"
    rows = load_last_run(csv_path)
    md = csv_path.with_suffix(".md")
    md.write_text(markdown(rows))
    drew = plot(rows, csv_path.with_suffix(".png"))
    print(f"wrote {md}" + (f" and {csv_path.with_suffix('.png')}" if drew else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
