"""The report of tk_experiment.py, written from the cells complete so far: report/report.md (each
of Tsilivis & Kempe's claims with its numbers and the criterion it is checked by, then every
table), features_by_index.png, consistency.png, feature_images_{task}.png (every architecture's
feature images, one above the other), results.json and commands.sh. It reads only the cells'
results, so the same cells give the same report.
"""
from __future__ import annotations

import math
import os

import numpy as np

import utils
from grid_cells import read_json
from grid_report import fmt, spearman

TOP = 5   # the "top of the spectrum": eigen-indices 0..TOP-1 (fewer if --n_features is smaller)
CONSISTENT_COS = 0.5   # median cosine over the leading indices that counts as "consistent"
TRANSFER_MARGIN = 0.1   # accuracy drop beyond random signs that counts as "transfers"


def relative_change(run):
    """|K_T - K_0|_F / |K_0|_F of one run of a dynamics.json, from its norms and its distance to K_0."""
    a, b, d = run["frobenius_norm"][-1], run["frobenius_norm"][0], run["distance_to_init"][-1]
    return math.sqrt(max(a * a + b * b - 2 * a * b * (1 - d), 0.0)) / b


def collect(grid, cells, markers):
    """The results of the complete cells: kernel[task][arch] = {'features', 'fgsm', 'pgd'} (their
    JSON), finite[arch][width] = run_exp's results, motion[arch][width] = the kernel's relative change."""
    out = {"kernel": {}, "finite": {}, "motion": {}}
    for c in cells:
        res = read_json(c.result_file) if c.name in markers else None
        if res is None:
            continue
        co = c.coords
        if c.kind == "tk:finite":
            out["finite"].setdefault(co["arch"], {})[co["width"]] = res.get("standard", {})
        elif c.kind == "tk:motion":
            out["motion"][co["arch"]] = {w: relative_change(res["runs"][f"w{w}"]) for w in grid["widths"]
                                         if f"w{w}" in res.get("runs", {})}
        else:
            part = "features" if c.kind == "tk:features" else co["method"]
            out["kernel"].setdefault(co["task"], {}).setdefault(co["arch"], {})[part] = res
    return out


# --------------------------------------------------------------------------------------
# The measures
# --------------------------------------------------------------------------------------
def cosines(a, b):
    """cos(a_i, b_j) for every pair of rows of a [F, ...] and b [F, ...] (flattened rows)."""
    a, b = np.asarray(a, float).reshape(len(a), -1), np.asarray(b, float).reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a @ b.T) / np.maximum(np.outer(na, nb), 1e-300)


def consistency(grid, kernel):
    """Per task, per pair of architectures: the cosine, over the test images (and classes), of
    the eigen-features of the same index, and the baseline of mismatched leading indices."""
    out = {}
    for task, archs in kernel.items():
        have = [a for a in grid["archs"] if "features" in archs.get(a, {})]
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                fa, fb = archs[a]["features"], archs[b]["features"]
                idx = [r["index"] for r in fa["features"]]
                cos = cosines(fa["feature_values"]["values"], fb["feature_values"]["values"])
                lead = [j for j, k in enumerate(idx) if k < grid["n_features"]]
                off = [abs(cos[j, k]) for j in lead for k in lead if j != k]
                pred = cosines([fa["feature_values"]["predictor"]], [fb["feature_values"]["predictor"]])[0, 0]
                out.setdefault(task, []).append({
                    "pair": [a, b], "indices": idx, "cos_same_index": np.diag(cos).tolist(),
                    "median_cos_leading": float(np.median(np.diag(cos)[lead])),
                    "median_abs_cos_mismatched": float(np.median(off)) if off else float("nan"),
                    "cos_predictors": float(pred)})
    return out


def spectrum_robustness(grid, features):
    """Mean FGSM-attacked (and clean) accuracy of the top TOP eigen-features and of the tail
    (indices >= n_features), and Spearman's rho between the index and the attacked accuracy."""
    rows = features["features"]
    top = [r for r in rows if r["index"] < min(TOP, grid["n_features"])]
    tail = [r for r in rows if r["index"] >= grid["n_features"]]

    def mean(sel, key):
        return float(np.mean([r[key] for r in sel])) if sel else float("nan")

    return {"top_attacked": mean(top, "acc_feature_attacked"), "tail_attacked": mean(tail, "acc_feature_attacked"),
            "top_clean": mean(top, "acc_clean"), "tail_clean": mean(tail, "acc_clean"),
            "spearman_index_attacked": spearman([r["index"] for r in rows], [r["acc_feature_attacked"] for r in rows])}


def transfer_rows(grid, results):
    """One row per task, attack, architecture and width: the network's accuracies."""
    rows = []
    for task, archs in results["kernel"].items():
        for arch in grid["archs"]:
            for method in ("fgsm", "pgd"):
                res = archs.get(arch, {}).get(method)
                for t in (res or {}).get("network_transfer", []):
                    width = t["width"]
                    rows.append({"task": task, "arch": arch, "method": method, "width": width,
                                 "kernel_change": results["motion"].get(arch, {}).get(width),
                                 "acc_clean": t["acc_clean"], "acc_on_kernel_examples": t["acc_on_ntk_examples"],
                                 "acc_random_sign": t["acc_random_sign"], "acc_own_pgd": t["acc_own_pgd"]})
    return rows


# --------------------------------------------------------------------------------------
# The claims
# --------------------------------------------------------------------------------------
def claims(grid, results, cons, transfer):
    kernel = results["kernel"]
    md = []
    chance = {t: 1 / (2 if t == "binary" else _n_classes(grid)) for t in grid["tasks"]}

    # 1. training-free adversarial examples
    cells = [(t, a, r) for t in grid["tasks"] for a in grid["archs"]
             for r in [kernel.get(t, {}).get(a, {})] if "fgsm" in r and "pgd" in r]
    ok = [all(r[m]["kernel_predictor"]["acc_robust"] < chance[t] < r["fgsm"]["kernel_predictor"]["acc_clean"]
              for m in ("fgsm", "pgd")) for t, a, r in cells]
    md += [f"1. **The kernel alone makes adversarial examples (\"training-free\").** Criterion: in every task and "
           f"architecture the predictor's clean accuracy is above chance and its FGSM and PGD accuracy below it. "
           f"{_verdict(ok)} "
           + "; ".join(f"{a} {t}: clean {fmt(r['fgsm']['kernel_predictor']['acc_clean'])}, FGSM "
                       f"{fmt(r['fgsm']['kernel_predictor']['acc_robust'])}, PGD {fmt(r['pgd']['kernel_predictor']['acc_robust'])}"
                       for t, a, r in cells) + "."]

    # 2. robust features at the top of the spectrum
    spec = [(t, a, spectrum_robustness(grid, r["features"])) for t in grid["tasks"] for a in grid["archs"]
            for r in [kernel.get(t, {}).get(a, {})] if "features" in r]
    ok = [s["top_attacked"] - s["tail_attacked"] >= 0.1 for _, _, s in spec]
    md += [f"2. **Robust features sit at the top of the spectrum; the tail is useful-looking but not robust.** "
           f"Criterion: the mean FGSM-attacked accuracy of eigen-features 0..{min(TOP, grid['n_features']) - 1} exceeds "
           f"that of the tail (indices ≥ {grid['n_features']}) by at least 0.1, in every task and architecture. "
           f"{_verdict(ok)} "
           + "; ".join(f"{a} {t}: top {fmt(s['top_attacked'])} vs tail {fmt(s['tail_attacked'])} attacked "
                       f"(clean {fmt(s['top_clean'])} vs {fmt(s['tail_clean'])}; Spearman ρ(index, attacked) "
                       f"{fmt(s['spearman_index_attacked'])})" for t, a, s in spec) + "."]

    # 3. consistency across architectures
    pairs = [(t, p) for t in grid["tasks"] for p in cons.get(t, [])]
    ok = [p["median_cos_leading"] >= CONSISTENT_COS for _, p in pairs]
    md += [f"3. **The eigen-features are consistent across architectures.** Measure: the cosine between two "
           f"architectures' eigen-feature of the same index, over the {grid['n_test']} test images (and the outputs). "
           f"Criterion: its median over the leading {grid['n_features']} indices is at least {CONSISTENT_COS} for every "
           f"pair (the baseline is the median |cosine| between features of different leading indices). "
           f"{_verdict(ok)} "
           + "; ".join(f"{p['pair'][0]}/{p['pair'][1]} {t}: {fmt(p['median_cos_leading'])} (baseline "
                       f"{fmt(p['median_abs_cos_mismatched'])}; predictors {fmt(p['cos_predictors'])})" for t, p in pairs)
           + "."]

    # 4. transfer to lazily trained finite networks
    widest = max(grid["widths"])
    sel = [r for r in transfer if r["width"] == widest]
    ok = [r["acc_random_sign"] - r["acc_on_kernel_examples"] >= TRANSFER_MARGIN for r in sel]
    lazier = [(a, results["motion"][a]) for a in grid["archs"] if len(results["motion"].get(a, {})) >= 2]
    ok_lazy = [m[max(m)] < m[min(m)] for _, m in lazier]
    md += [f"4. **The kernel's examples transfer to finite networks of the same architecture trained lazily.** "
           f"Criterion: the widest network's ({widest}) accuracy on the kernel's FGSM and PGD examples is at least "
           f"{TRANSFER_MARGIN} below its accuracy under random ±ε signs (the same perturbation size in no chosen "
           f"direction), in every task, attack and architecture. {_verdict(ok)} "
           + "; ".join(f"{r['arch']} {r['task']} {r['method'].upper()}: {fmt(r['acc_on_kernel_examples'])} vs random "
                       f"{fmt(r['acc_random_sign'])} (clean {fmt(r['acc_clean'])})" for r in sel) + ".",
           f"5. **Wider is lazier.** Criterion: the relative change ‖K_T − K_0‖_F / ‖K_0‖_F of the empirical NTK "
           f"during training is smaller for the widest network than for the narrowest, for every architecture. "
           f"{_verdict(ok_lazy)} "
           + "; ".join(f"{a}: " + ", ".join(f"width {w} {fmt(c)}" for w, c in sorted(m.items())) for a, m in lazier)
           + "."]
    return md


def _n_classes(grid):
    import data
    return data.num_classes_of(grid["dataset"])


def _verdict(checks):
    """The verdict on a claim from its checks (one bool per task, architecture, ...)."""
    if not checks:
        return "*Not measured yet (its cells are missing).*"
    k, n = sum(checks), len(checks)
    return f"**Holds here** ({n} of {n})." if k == n else f"**Holds in only {k} of {n}.**" if k else \
        f"**Does not hold here** (0 of {n})."


# --------------------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------------------
def features_figure(grid, kernel, path):
    """Clean and FGSM-attacked accuracy of every eigen-feature against its index: one row per task,
    one line per architecture."""
    import matplotlib.pyplot as plt
    import plots
    tasks = [t for t in grid["tasks"] if t in kernel]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        chance = 0.5 if task == "binary" else 1 / _n_classes(grid)
        for arch in grid["archs"]:
            feats = kernel[task].get(arch, {}).get("features")
            if feats is None:
                continue
            idx = np.array([r["index"] for r in feats["features"]])
            for ax, key in zip(row, ("acc_clean", "acc_feature_attacked")):
                ax.plot(idx + 1, [r[key] for r in feats["features"]], marker="o", ms=3, label=arch)
        for ax, words in zip(row, ("clean accuracy", "accuracy under FGSM on the feature")):
            ax.axhline(chance, color="grey", lw=0.8, ls="--")
            ax.set(xscale="log", xlabel="eigen-index + 1 (largest eigenvalue first)", ylabel=words, ylim=(-0.02, 1.02),
                   title=f"{task} task: {words}")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    return plots.save_fig(fig, path)


def consistency_figure(grid, cons, path):
    import matplotlib.pyplot as plt
    import plots
    tasks = [t for t in grid["tasks"] if t in cons]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for p in cons[task]:
            ax.plot(np.array(p["indices"]) + 1, p["cos_same_index"], marker="o", ms=3, label="/".join(p["pair"]))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xscale="log", ylim=(-1.02, 1.02), xlabel="eigen-index + 1", ylabel="cosine over the test images",
               title=f"{task} task: same eigen-feature, two architectures")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return plots.save_fig(fig, path)


def images_figure(grid, kernel, task, path):
    """Every architecture's feature_images.png of the task, one above the other."""
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    import plots
    panels = [(a, kernel[task][a]["features"]["figures"][-1]) for a in grid["archs"]
              if "features" in kernel[task].get(a, {}) and len(kernel[task][a]["features"]["figures"]) > 1]
    panels = [(a, p) for a, p in panels if os.path.isfile(p)]
    if not panels:
        return None
    images = [mpimg.imread(p) for _, p in panels]
    width = max(im.shape[1] for im in images)
    fig, axes = plt.subplots(len(images), 1, figsize=(width / 120, sum(im.shape[0] for im in images) / 120 + 0.4 * len(images)),
                             squeeze=False)
    for ax, (arch, _), im in zip(axes[:, 0], panels, images):
        ax.imshow(im)
        ax.set_axis_off()
        ax.set_title(arch, loc="left", fontsize=12, fontweight="bold")
    return plots.save_fig(fig, path)


# --------------------------------------------------------------------------------------
def write_report(grid, cells, markers, command):
    """report/: report.md, the figures, results.json, commands.sh. Returns report.md's path."""
    results = collect(grid, cells, markers)
    kernel = results["kernel"]
    cons = consistency(grid, kernel)
    transfer = transfer_rows(grid, results)
    rdir = os.path.join(grid["out_dir"], "report")
    os.makedirs(rdir, exist_ok=True)
    missing = [c.name for c in cells if c.name not in markers]
    figures = []
    if kernel:
        figures.append(("eigen-feature accuracy, clean and under FGSM, against the index",
                        features_figure(grid, kernel, os.path.join(rdir, "features_by_index.png"))))
    if cons:
        figures.append(("cosine of the same eigen-feature in two architectures",
                        consistency_figure(grid, cons, os.path.join(rdir, "consistency.png"))))
    for task in kernel:
        path = images_figure(grid, kernel, task, os.path.join(rdir, f"feature_images_{task}.png"))
        if path:
            figures.append((f"{task} task: input gradients of eigen-features, every architecture", path))
    utils.atomic_json(os.path.join(rdir, "results.json"),
                      {"settings": grid, "consistency": cons, "transfer": transfer,
                       "kernel_motion": results["motion"], "missing": missing,
                       "predictor": {t: {a: {m: r[m]["kernel_predictor"] for m in ("fgsm", "pgd") if m in r}
                                         for a, r in archs.items()} for t, archs in kernel.items()},
                       "features": {t: {a: r["features"]["features"] for a, r in archs.items() if "features" in r}
                                    for t, archs in kernel.items()}})
    commands = ["#!/usr/bin/env bash", "# The exact runs of this experiment, from the repository root, in dependency "
                "order.", "set -euo pipefail"] + [c.command() for c in cells]
    utils.atomic_write_bytes(os.path.join(rdir, "commands.sh"), ("\n".join(commands) + "\n").encode())

    g = grid
    md = [f"# Tsilivis & Kempe on infinite-width NTKs ({g['preset']})", ""]
    if missing:
        md += [f"**Incomplete: {len(missing)} of {len(cells)} cells are missing** "
               f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); their numbers read n/a.", ""]
    sizes = ("all" if not g["train_size"] else str(g["train_size"]), "all" if not g["test_size"] else str(g["test_size"]))
    md += ["## Settings", "",
           f"- data: {g['dataset']}; tasks: {', '.join(g['tasks'])} (binary: classes {g['classes'][0]} and "
           f"{g['classes'][1]})",
           f"- kernels: the analytic infinite-width NTK of {', '.join(g['archs'])} (W_std √2, b_std 0.1, ReLU, NTK "
           f"parameterization), float64",
           f"- predictor: ridgeless regression on {g['n_train']} class-balanced training images with centered one-hot "
           f"targets (two classes: the notebook's ±1 predictor), evaluated on {g['n_test']} test images",
           f"- attacks: L∞ ε {g['eps']:g}/255; FGSM (one step of ε·sign from the clean image); PGD-{g['pgd_steps']}, "
           f"step {g['pgd_step']:g}/255, no random start; each eigen-feature under FGSM on itself",
           f"- finite networks: run_exp.py, widths {', '.join(map(str, g['widths']))}, {g['train_epochs']} epochs of "
           f"clean SGD (momentum 0.9) at lr {g['lr']:g}, batch {g['batch_size']}, on {sizes[0]} training images "
           f"(evaluated on {sizes[1]}); trained on every class, so in the binary task a network's accuracy is its "
           f"10-way accuracy on the two classes' images",
           f"- kernel motion: the empirical NTK of each finite network on {g['motion_size']} training images at every "
           f"saved epoch (analyze_ntk.py dynamics)", ""]
    md += ["## The paper's claims, checked here", ""] + claims(grid, results, cons, transfer) + [""]
    md += [f"![{words}]({os.path.basename(path)})" for words, path in figures] + [""]
    md += ["## The kernel predictor", "", "| task | architecture | clean | FGSM | PGD |", "|---|---|---|---|---|"]
    for t in g["tasks"]:
        for a in g["archs"]:
            r = kernel.get(t, {}).get(a, {})
            md.append(f"| {t} | {a} | {fmt(r.get('fgsm', {}).get('kernel_predictor', {}).get('acc_clean'))} | "
                      f"{fmt(r.get('fgsm', {}).get('kernel_predictor', {}).get('acc_robust'))} | "
                      f"{fmt(r.get('pgd', {}).get('kernel_predictor', {}).get('acc_robust'))} |")
    for t in g["tasks"]:
        archs = [a for a in g["archs"] if "features" in kernel.get(t, {}).get(a, {})]
        if not archs:
            continue
        md += ["", f"## Eigen-features, {t} task: clean accuracy / accuracy under FGSM on the feature", "",
               "Index 0 is the largest eigenvalue (the notebook's count; the figures count from 1).", "",
               "| index | " + " | ".join(archs) + " |", "|---" * (len(archs) + 1) + "|"]
        per = {a: {r["index"]: r for r in kernel[t][a]["features"]["features"]} for a in archs}
        for i in sorted(set().union(*per.values())):
            md.append(f"| {i} | " + " | ".join(f"{fmt(per[a][i]['acc_clean'])} / {fmt(per[a][i]['acc_feature_attacked'])}"
                                               if i in per[a] else "n/a" for a in archs) + " |")
    md += ["", "## Transfer to the finite networks", "",
           "Accuracy of each network on the clean test images, on the kernel's adversarial examples, under random ±ε "
           "signs, and under its own white-box PGD; the relative change ‖K_T − K_0‖ / ‖K_0‖ of its empirical NTK "
           "during training.", "",
           "| task | attack | architecture | width | kernel change | clean | kernel's examples | random signs | own PGD |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in transfer:
        md.append(f"| {r['task']} | {r['method'].upper()} | {r['arch']} | {r['width']} | {fmt(r['kernel_change'])} | "
                  f"{fmt(r['acc_clean'])} | {fmt(r['acc_on_kernel_examples'])} | {fmt(r['acc_random_sign'])} | "
                  f"{fmt(r['acc_own_pgd'])} |")
    md += ["", "## Commands", "", "The whole experiment (it skips complete cells, so it also resumes):", "", "```bash",
           command, "```", "", "It runs these commands, from the repository root (also in `commands.sh`; "
           "`results.json` holds every number above):", "", "```bash"] + [c.command() for c in cells] + ["```", ""]
    path = os.path.join(rdir, "report.md")
    utils.atomic_write_bytes(path, "\n".join(md).encode())
    return path
