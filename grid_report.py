"""The report of kernel_epoch_grid.py, written from the cells complete so far: report/report.md
(the paper's claims checked on the grid with numbers, a mean ± std summary, every cell, the
commands), grid.png (accuracy and kernel distance against the kernel epoch), results.json,
results.csv and commands.sh. It depends only on the cells' results (no timings or dates), so the
same cells give the same report.
"""
from __future__ import annotations

import math
import os

import utils
from grid_cells import KIND_WORDS, PHASE1_KINDS, PHASE2_KINDS, epoch_name, read_json

def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def _mean_std(values):
    import numpy as np
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(m, sd, n):
    if n == 0:
        return "n/a"
    return f"{m:.3f}" if n == 1 else f"{m:.3f} ± {sd:.3f}"


def collect(grid, cells, markers):
    """Rows of every phase-2 cell, phase-1 finals and kernel distances, from the cell directories."""
    rows, finals, dist = [], [], {}
    for c in cells:
        marker = markers.get(c.name)
        if c.kind.startswith("phase1"):
            res = read_json(c.result_file) if marker else None
            r = (res or {}).get("standard", {})
            finals.append({"phase1": c.coords["phase1"], "seed": c.coords["seed"], "complete": bool(marker),
                           **{k: r.get(k) for k in ("clean", "linf", "l2")}})
        elif c.kind.startswith("phase2"):
            row = {"phase1": c.coords["phase1"], "phase2": c.coords["phase2"], "kernel_epoch": c.coords["epoch"],
                   "seed": c.coords["seed"], "status": marker["status"] if marker else "missing",
                   "clean": None, "linf": None, "l2": None}
            if marker and marker["status"] == "ok":
                r = (read_json(c.result_file) or {}).get("linear", {})
                row.update({k: r.get(k) for k in ("clean", "linf", "l2")})
            rows.append(row)
        elif marker:
            d = read_json(c.result_file) or {}
            for label, run in d.get("runs", {}).items():
                matrix = run["distance_matrix"]
                dist.setdefault(label, {})[c.coords["seed"]] = {
                    "epochs": run["epochs"], "to_final": [r[-1] for r in matrix],
                    "to_init": run["distance_to_init"]}
    return rows, finals, dist


def _distance_at(dist, k1, e):
    """Mean and std over seeds of d(K_e, K_T) of phase-1 kind k1 at epoch e."""
    vals = []
    for run in dist.get(k1, {}).values():
        if e in run["epochs"]:
            vals.append(run["to_final"][run["epochs"].index(e)])
    return _mean_std(vals)


def _curve(rows, k1, k2, metric, epochs):
    return [_mean_std([r[metric] for r in rows if (r["phase1"], r["phase2"], r["kernel_epoch"]) == (k1, k2, e)])
            for e in epochs]


def claims(grid, rows, finals, epochs):
    """The paper's claims, each checked on this grid with numbers (markdown lines)."""
    import numpy as np

    def stat(k1, k2, e, metric="linf"):
        return _mean_std([r[metric] for r in rows if (r["phase1"], r["phase2"], r["kernel_epoch"]) == (k1, k2, e)])

    def final(k1, metric="linf"):
        return _mean_std([f[metric] for f in finals if f["phase1"] == k1])

    def se(sd, n):
        return sd / math.sqrt(n) if n > 1 else float("nan")

    if any(stat(k1, k2, e)[2] == 0 for k1 in PHASE1_KINDS for k2 in PHASE2_KINDS for e in epochs):
        return ["Not every combination has a complete cell yet: the claims are checked once the grid is complete."]
    lines = []
    e0, eT = epochs[0], epochs[-1]
    pos = [e for e in epochs if e > 0]
    # Claim 1a: benign phase 2 on AT kernels keeps robustness that grows with e.
    a0, aT = stat("AC", "CC", e0), stat("AC", "CC", eT)
    curve = [stat("AC", "CC", e)[0] for e in epochs]
    rho = spearman(epochs, curve)
    diff = aT[0] - a0[0]
    diff_se = math.sqrt(se(a0[1], a0[2]) ** 2 + se(aT[1], aT[2]) ** 2)
    grows = (len(epochs) > 1 and diff > 0 and (math.isnan(diff_se) or diff > 2 * diff_se)
             and (math.isnan(rho) or rho > 0))
    lines.append(
        f"1. **Benign phase 2 on adversarially trained kernels keeps robustness that grows with e.** "
        f"L∞ PGD accuracy of benign centered training on the AT kernel: {_fmt(*a0)} at e = {epoch_name(e0)}, "
        f"{_fmt(*aT)} at e = {epoch_name(eT)} (difference {diff:+.3f}"
        + (f", standard error {diff_se:.3f}" if not math.isnan(diff_se) else "")
        + (f"; Spearman ρ of the mean against e: {rho:+.2f}" if not math.isnan(rho) else "")
        + f"); the AT network itself (end of phase 1): "
        f"{_fmt(*final('AC'))}. Best over e: {max(curve):.3f} at e = {epoch_name(epochs[int(np.argmax(curve))])}. "
        f"**{'Consistent' if grows else 'Not consistent'} with the claim** (criterion: the mean at the last e "
        f"exceeds the one at the first e by more than twice the standard error of the difference, and ρ > 0 "
        f"when there are 3 or more epochs).")
    # Claim 1b: benign (CC) kernels give none.
    if pos:
        cc = [stat("CC", "CC", e) for e in pos]
        gap = [stat("AC", "CC", e)[0] - c[0] for e, c in zip(pos, cc)]
        fin_cc = final("CC")
        none = all(g > 0 for g in gap) and max(c[0] for c in cc) <= fin_cc[0] + 0.1
        lines.append(
            "2. **Benign kernels give none.** L∞ PGD accuracy of benign centered training on the clean-trained "
            "kernel, over e > 0: " + ", ".join(f"{_fmt(*c)} (e = {epoch_name(e)})" for c, e in zip(cc, pos))
            + f"; the clean network itself: {_fmt(*fin_cc)}. The AT kernel's advantage at the same e: "
            + ", ".join(f"{g:+.3f}" for g in gap)
            + f". **{'Consistent' if none else 'Not consistent'} with the claim** (criterion: the AT kernel beats "
            f"the benign kernel at every e > 0, and the benign kernel's best stays within 0.1 of the clean "
            f"network's).")
    # Claim 2: adversarial training on a fixed kernel gains robustness.
    for n, (k1, words) in enumerate((("AC", "adversarially trained"), ("CC", "clean-trained")), start=3):
        gains = [stat(k1, "CA", e)[0] - stat(k1, "CC", e)[0] for e in epochs]
        best = [stat(k1, "CA", e) for e in epochs]
        i = int(np.argmax([b[0] for b in best]))
        gain_pos = [g for e, g in zip(epochs, gains) if e > 0]
        mean_gain = float(np.mean(gain_pos)) if gain_pos else float("nan")
        lines.append(
            f"{n}. **Adversarial training on a fixed {words} kernel gains robustness.** "
            f"L∞ PGD gain of adversarial (CA) over benign (CC) phase 2 at each e: "
            + ", ".join(f"{g:+.3f} (e = {epoch_name(e)})" for e, g in zip(epochs, gains))
            + f"; mean over e > 0: {mean_gain:+.3f}. Best CA phase 2: L∞ PGD {_fmt(*best[i])} at clean "
            f"{_fmt(*stat(k1, 'CA', epochs[i], 'clean'))} (e = {epoch_name(epochs[i])}). "
            f"**{'Consistent' if mean_gain > 0 else 'Not consistent'} with the claim** (criterion: a positive "
            f"mean gain over e > 0).")
    return lines


def fmt(x, spec=".3f"):
    """A number for a report: "n/a" when it is missing (None or NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def spearman(x, y):
    import numpy as np
    pairs = [(a, b) for a, b in zip(x, y) if not math.isnan(b)]
    if len(pairs) < 3:
        return float("nan")
    rx = np.argsort(np.argsort([p[0] for p in pairs]))
    ry = np.argsort(np.argsort([p[1] for p in pairs]))
    return float(np.corrcoef(rx, ry)[0, 1]) if np.std(ry) > 0 else float("nan")


def figure(grid, rows, finals, dist, epochs, path):
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt
    import numpy as np
    colors = {"CC": "tab:blue", "AC": "tab:red"}
    styles = {"CC": ("-", "o"), "CA": ("--", "s")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    panels = (("clean", "clean accuracy"),
              ("linf", f"L∞ PGD-{grid['pgd_eval_steps']} accuracy (ε {grid['eps']:g}/255)"),
              ("l2", f"L2 PGD-{grid['pgd_eval_steps']} accuracy (ε {0.25:g})"))
    for ax, (metric, title) in zip(axes.flat, panels):
        for k1 in PHASE1_KINDS:
            for k2 in PHASE2_KINDS:
                stats = _curve(rows, k1, k2, metric, epochs)
                m = np.array([x[0] for x in stats])
                sd = np.array([x[1] for x in stats])
                ls, mk = styles[k2]
                ax.errorbar(epochs, m, yerr=sd, color=colors[k1], ls=ls, marker=mk, ms=4, capsize=3,
                            label=f"{KIND_WORDS[k1]} kernel ({k1}), {KIND_WORDS[k2]} phase 2 ({k2})")
            fm, fsd, n = _mean_std([f[metric] for f in finals if f["phase1"] == k1])
            if n:
                ax.axhline(fm, color=colors[k1], ls=":", lw=1.2, label=f"phase-1 {k1} network at epoch "
                                                                         f"{grid['phase1_epochs']}")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy")
    ax = axes[1, 1]
    for k1 in PHASE1_KINDS:
        runs = list(dist.get(k1, {}).values())
        if not runs:
            continue
        common = sorted(set.intersection(*[set(r["epochs"]) for r in runs]))
        vals = np.array([[r["to_final"][r["epochs"].index(e)] for e in common] for r in runs])
        m, sd = vals.mean(0), vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(common))
        ax.plot(common, m, color=colors[k1], lw=1.5, label=f"{k1} run ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.fill_between(common, m - sd, m + sd, color=colors[k1], alpha=0.2)
        marked = [e for e in epochs if e in common]
        ax.plot(marked, [m[common.index(e)] for e in marked], "o", color=colors[k1], ms=5)
    ax.set_title("kernel distance to the final kernel d(K_e, K_T)")
    ax.set_ylabel("1 - cos(K_e, K_T)  (Frobenius)")
    ax.legend(fontsize=8)
    pos = [e for e in epochs if e > 0]
    for ax in axes.flat:
        if pos:
            ax.set_xscale("symlog", linthresh=min(pos))
        ax.set_xlim(-0.05 * min(pos or [1]), grid["phase1_epochs"] * 1.08)
        ax.set_xticks(epochs, [epoch_name(e) for e in epochs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("kernel epoch e (phase-1 checkpoint; symlog axis)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, bbox_to_anchor=(0.5, -0.06))
    n_seeds = len(grid["seeds"])
    fig.suptitle(f"{grid['preset']}: {grid['dataset']}, {grid['model']} width {grid['width']}; phase 1 {plural(grid['phase1_epochs'], 'epoch')}, "
                 f"phase 2 (centered) {plural(grid['phase2_epochs'], 'epoch')} at lr "
                 f"{grid['second_lr']:g}; mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    utils.atomic_write_bytes(path, buf.getvalue())


def write_report(grid, cells, markers, grid_command):
    """report/: report.md, grid.png, results.json, results.csv, commands.sh. Returns report.md's path.
    Depends only on the cells' results (no timings or dates), so the same cells give the same report."""
    import csv
    import io
    rows, finals, dist = collect(grid, cells, markers)
    epochs = grid["kernel_epochs"]
    rdir = os.path.join(grid["out_dir"], "report")
    os.makedirs(rdir, exist_ok=True)
    missing = [c.name for c in cells if c.name not in markers]
    figure(grid, rows, finals, dist, epochs, os.path.join(rdir, "grid.png"))
    utils.atomic_json(os.path.join(rdir, "results.json"),
                      {"settings": {k: v for k, v in grid.items()}, "phase2": rows, "phase1_final": finals,
                       "kernel_distance": dist, "missing": missing})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["phase1"])
    w.writeheader()
    w.writerows(rows)
    utils.atomic_write_bytes(os.path.join(rdir, "results.csv"), buf.getvalue().encode())
    commands = ["#!/usr/bin/env bash", "# The exact runs of this grid, from the repository root, in dependency order.",
                "set -euo pipefail"] + [c.command() for c in cells]
    utils.atomic_write_bytes(os.path.join(rdir, "commands.sh"), ("\n".join(commands) + "\n").encode())

    md = [f"# Robustness of phase 2 against the kernel epoch ({grid['preset']})", ""]
    if missing:
        md += [f"**Incomplete: {len(missing)} of {len(cells)} cells are missing** "
               f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); their rows read n/a.", ""]
    md += ["## Settings", "",
           f"- data: {grid['dataset']}" + (f" (train subset {grid['train_size']}" if grid["train_size"] else " (all training images")
           + (f", test subset {grid['test_size']})" if grid["test_size"] else ", all test images)"),
           f"- network: {grid['model']}, width {grid['width']}; batch {grid['batch_size']}",
           f"- phase 1: {plural(grid['phase1_epochs'], 'epoch')}, benign (CC) and adversarial (AC: a clean step and a PGD-20 step "
           f"per batch, ε {grid['eps']:g}/255), lr 0.1, checkpoints at every epoch and at 0.125, 0.25, 0.375, 0.5, 0.75, "
           f"1.5, 2.5",
           f"- phase 2: centered dynamics J(θ_e)(θ − θ_e) on the frozen kernel of the epoch-e checkpoint, "
           f"{plural(grid['phase2_epochs'], 'epoch')} at lr {grid['second_lr']:g}, "
           f"benign (CC) or adversarial (CA)",
           f"- kernel epochs e: {', '.join(map(epoch_name, epochs))}; seeds: {', '.join(map(str, grid['seeds']))}",
           f"- evaluation (run_exp.py after phase 2): clean, L∞ PGD-{grid['pgd_eval_steps']} at ε {grid['eps']:g}/255, "
           f"L2 PGD-{grid['pgd_eval_steps']} at ε 0.25",
           f"- kernel motion: analyze_ntk.py dynamics on {grid['dynamics_size']} training images, every checkpoint of "
           f"both phase-1 runs; d(K, K') = 1 − ⟨K, K'⟩ / (‖K‖ ‖K'‖)", ""]
    md += ["## What the grid shows", ""] + claims(grid, rows, finals, epochs) + [""]
    md += ["![accuracy and kernel distance against the kernel epoch](grid.png)", ""]
    md += ["## Summary (mean ± std over seeds)", "",
           "Clean / L∞ PGD accuracy of phase 2 on the kernel of the phase-1 run at epoch e, and the kernel distance "
           "d(K_e, K_T) of that run to its final kernel.", "",
           "| e | d(K_e,K_T) CC | d(K_e,K_T) AC | CC kernel, CC phase 2 | CC kernel, CA phase 2 | AC kernel, CC phase 2 "
           "| AC kernel, CA phase 2 |", "|---|---|---|---|---|---|---|"]
    for e in epochs:
        cols = [_fmt(*_distance_at(dist, k1, e)) for k1 in PHASE1_KINDS]
        for k1 in PHASE1_KINDS:
            for k2 in PHASE2_KINDS:
                sel = [r for r in rows if (r["phase1"], r["phase2"], r["kernel_epoch"]) == (k1, k2, e)]
                cols.append(f"{_fmt(*_mean_std([r['clean'] for r in sel]))} / {_fmt(*_mean_std([r['linf'] for r in sel]))}")
        md.append(f"| {epoch_name(e)} | " + " | ".join(cols) + " |")
    md += ["", "Phase-1 networks at the end of phase 1 (standard dynamics):", "",
           "| phase 1 | clean | L∞ PGD | L2 PGD |", "|---|---|---|---|"]
    for k1 in PHASE1_KINDS:
        sel = [f for f in finals if f["phase1"] == k1]
        md.append(f"| {k1} | " + " | ".join(_fmt(*_mean_std([f[m] for f in sel])) for m in ("clean", "linf", "l2")) + " |")
    md += ["", "## Every cell", "", "| phase 1 (kernel) | phase 2 | kernel epoch | seed | clean | L∞ PGD | L2 PGD |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        vals = [fmt(r[m]) for m in ("clean", "linf", "l2")] if r["status"] == "ok" else [r["status"]] * 3
        md.append(f"| {r['phase1']} | {r['phase2']} | {epoch_name(r['kernel_epoch'])} | {r['seed']} | " + " | ".join(vals) + " |")
    md += ["", "## Commands", "", "The whole grid (it skips complete cells, so it also resumes):", "", "```bash",
           grid_command, "```", "",
           "It runs these commands, from the repository root (also in `commands.sh`; `results.json` and "
           "`results.csv` hold every number above):", "", "```bash"] + [c.command() for c in cells] + ["```", ""]
    path = os.path.join(rdir, "report.md")
    utils.atomic_write_bytes(path, "\n".join(md).encode())
    return path

