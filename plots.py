"""The figures of the NTK analyses, drawn with matplotlib's Agg backend (no display needed).

* analyze_ntk.py dynamics (`dynamics_figures`): one kernel-distance heat map per run (one
  colour scale for all runs), the polar dynamics of the full kernel and of its top-k and
  bottom-k eigenspaces (with --full: all but the top k), the same radius and angle against the
  epoch, and the eigenvalue masses, the distance to K_0 and the kernel velocity against the epoch.
* analyze_ntk.py features (`features_figure`): usefulness and robustness of every analysed
  eigen-feature, and the spectrum.
* visualize_ntk_features.py (`eigen_images_figure`): the eigen-images and the spectrum.

Epoch axes are symlog from epoch 0, so the fractional epochs of the first epoch and the last
epochs all show. The figures read only the summaries the analyses write to JSON (or pickle).
"""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

import utils  # noqa: E402


def save_fig(fig, path):
    """Write `fig` as a PNG at `path` (atomically), close it, return `path`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    utils.atomic_write_bytes(path, buf.getvalue())
    return path


def _colors():
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _epoch_axis(ax, epochs):
    """Symlog x-axis from epoch 0 (no negative epochs): linear up to the smallest positive epoch,
    logarithmic above, so 0, 0.125, ... and 20 all show."""
    pos = [e for e in epochs if e > 0]
    if pos:
        ax.set_xscale("symlog", linthresh=min(pos), linscale=0.5)
        ax.set_xlim(0, max(pos) * 1.15)
        ax.set_xlabel(f"epoch (linear to {min(pos):g}, log above)")
    else:
        ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------
# analyze_ntk.py dynamics
# --------------------------------------------------------------------------------------
def _eigenspace_titles(results, k_count):
    """The panel titles of the top and bottom parts, from the runs' 'eigenspaces' (kernel_motion):
    the bottom-k eigenspace, or with bottom 'rest' all but the top k (with the counts when every
    run has the same)."""
    spaces = [r.get("eigenspaces") or {"top_count": k_count, "bottom": "k", "bottom_count": k_count}
              for r in results.values()]
    tops = {s["top_count"] for s in spaces}
    top = tops.pop() if len(tops) == 1 else k_count
    if all(s["bottom"] == "rest" for s in spaces):
        counts = {(s["bottom_count"], s.get("size")) for s in spaces}
        if len(counts) == 1:
            m, n = counts.pop()
            bottom = f"bottom: all but the top {top} ({m} of {n} eigenvalues)"
        else:
            bottom = f"bottom: all but the top {top} eigenvalues"
    else:
        bottom = f"bottom-{top} eigenspace"
    return f"top-{top} eigenspace", bottom


def dynamics_figures(results, k_count, paths):
    """The figures of `dynamics` for `results` (label -> kernel_analysis.kernel_motion of the
    run), written to `paths`: one kernel-distance map per run, then the polar dynamics, polar
    against epoch and eigenvalue-mass figures. The bottom panels are titled by the runs'
    bottom definition (bottom-k, or all but the top k). Returns `paths`."""
    n_runs = len(results)
    top, bottom = _eigenspace_titles(results, k_count)
    parts = (("full", "full kernel"), ("top", top), ("bottom", bottom))
    return (_distance_figures(results, paths[:n_runs]) + [_polar_figure(results, parts, paths[n_runs]),
                                                          _polar_vs_epoch_figure(results, parts, paths[n_runs + 1]),
                                                          _mass_figure(results, paths[n_runs + 2])])


def _all_epochs(results):
    return sorted({e for r in results.values() for e in r["epochs"]})


def _distance_figures(results, paths):
    files = []
    # One colour scale for every run's distance matrix, so the figures compare.
    vmax = max(float(np.max(r["distance_matrix"])) for r in results.values()) or 1.0
    shared = len(results) > 1
    for (label, r), path in zip(results.items(), paths):
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
        step = -(-len(r["epochs"]) // 25)   # at most 25 labels, so they stay legible
        ticks = [f"{e:g}" if i % step == 0 else "" for i, e in enumerate(r["epochs"])]
        sns.heatmap(np.asarray(r["distance_matrix"]), ax=ax, xticklabels=ticks, yticklabels=ticks,
                    cmap="viridis", square=True, vmin=0.0, vmax=vmax,
                    cbar_kws={"label": "kernel distance d(K_s, K_t)" + (" (scale shared by all runs)" if shared else "")})
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        ax.set_title(f"{label}: kernel distance across checkpoints")
        files.append(save_fig(fig, path))
    return files


def _polar_figure(results, parts, path):
    """Angle = arccos(similarity to K_0), radius = normalised distance from K_0."""
    colors = _colors()
    fig = plt.figure(figsize=(15, 5.0))
    for j, (part, title) in enumerate(parts):
        ax = fig.add_subplot(1, 3, j + 1, projection="polar")
        max_angle = max(max(r["polar"][part]["angle"]) for r in results.values())
        for i, (label, r) in enumerate(results.items()):
            pol = r["polar"][part]
            c = colors[i % len(colors)]
            ax.plot(pol["angle"], pol["radius"], "-o", ms=3, color=c,
                    label=f"{label} (epochs {r['epochs'][0]:g} to {r['epochs'][-1]:g}, star: last)" if j == 0 else None)
            ax.plot(pol["angle"][-1], pol["radius"][-1], "*", ms=13, color=c, markeredgecolor="k", markeredgewidth=0.5)
        # at least a 10-degree wedge, so the angle labels never pile up on a near-zero angle
        ax.set_thetamin(0)
        ax.set_thetamax(min(180.0, max(10.0, 10.0 * np.ceil(np.degrees(max_angle) * 1.1 / 10.0))))
        ax.set_title(title, fontsize=11, pad=12)
    fig.suptitle("polar dynamics of the kernel: angle = arccos sim(K_t, K_0), radius = |K_t - K_0| / |K_T - K_0|",
                 fontsize=11)
    fig.legend(loc="lower center", ncol=len(results), fontsize=9, frameon=False)
    fig.subplots_adjust(bottom=0.1, top=0.86, wspace=0.3)
    return save_fig(fig, path)


def _polar_vs_epoch_figure(results, parts, path):
    colors, all_epochs = _colors(), _all_epochs(results)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex=True)
    for j, (part, title) in enumerate(parts):
        for i, (label, r) in enumerate(results.items()):
            pol = r["polar"][part]
            c = colors[i % len(colors)]
            axes[0, j].plot(r["epochs"], pol["radius"], "-o", ms=3, color=c, label=label)
            axes[1, j].plot(r["epochs"], np.degrees(pol["angle"]), "-o", ms=3, color=c, label=label)
        axes[0, j].set_title(title)
        axes[0, j].set_ylabel("radius |K_t-K_0| / |K_T-K_0|")
        axes[1, j].set_ylabel("angle to K_0 (degrees)")
        for ax in axes[:, j]:
            _epoch_axis(ax, all_epochs)
        axes[0, j].set_xlabel("")
    axes[0, 0].legend()
    return save_fig(fig, path)


def _mass_figure(results, path):
    """Top-m eigenvalue masses (one panel per m in the results' 'mass'), distance to K_0, velocity."""
    colors, all_epochs = _colors(), _all_epochs(results)
    mass_ks = [int(name[len("top"):]) for name in next(iter(results.values()))["mass"]]   # 'top10' -> 10
    fig, axes = plt.subplots(1, len(mass_ks) + 2, figsize=(19, 4.4))
    for i, (label, r) in enumerate(results.items()):
        c = colors[i % len(colors)]
        for j, m in enumerate(mass_ks):
            axes[j].plot(r["epochs"], r["mass"][f"top{m}"], "-o", ms=3, color=c, label=label)
        axes[-2].plot(r["epochs"], r["distance_to_init"], "-o", ms=3, color=c, label=label)
        v = [(e, x) for e, x in zip(r["epochs"], r["velocity"]) if x is not None and x > 0]  # log axis
        axes[-1].plot([e for e, _ in v], [x for _, x in v], "-o", ms=3, color=c, label=label)
    for j, m in enumerate(mass_ks):
        axes[j].set_title(f"top-{m} eigenvalue mass")
        axes[j].set_ylabel(rf"$\sum_{{i \leq {m}}} \lambda_i^2 \,/\, \sum_i \lambda_i^2$")
        axes[j].set_ylim(0, 1.02)
    axes[-2].set_title("kernel distance to K_0")
    axes[-2].set_ylabel("d(K_0, K_t)")
    axes[-1].set_title("kernel velocity")
    axes[-1].set_ylabel("d(K_t-1, K_t) / (epoch_t - epoch_t-1)")
    axes[-1].set_yscale("log")
    for ax in axes:
        _epoch_axis(ax, all_epochs)
    axes[0].legend()
    fig.tight_layout()
    return save_fig(fig, path)


# --------------------------------------------------------------------------------------
# analyze_ntk.py features
# --------------------------------------------------------------------------------------
def _network_name(summary):
    """The analysed kernel in words: its checkpoint (run directory and file) and network, or the
    architecture of an infinite-width kernel."""
    if summary.get("model_path") is None:   # an infinite-width kernel
        a = summary["architecture"]
        return f"infinite-width {a['arch']}-{a['depth']} ({a['parameterization']}, {summary['dataset']})"
    path = os.path.normpath(summary["model_path"])
    short = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    arch = summary["model"] + (f" width {summary['width']}" if summary["model"] == "resnet18" else "")
    at = ", at lin_params" if summary.get("use_linear_params") else ""
    return f"{short} ({arch}, {summary['dataset']}{at})"


def features_figure(summary, path):
    """Accuracy and label correlation of every analysed eigen-feature f_i, clean and under attack
    on f_i, and the spectrum of K(X,X), from the `features` summary; written to `path`."""
    rows = summary["features"]
    x = [r["index"] + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.4))
    ax = axes[0]
    ax.plot(x, [r["acc_clean"] for r in rows], "-o", ms=3, label="usefulness: clean accuracy of f_i")
    ax.plot(x, [r["acc_feature_attacked"] for r in rows], "-s", ms=3, label="robustness: accuracy of f_i under attack on f_i")
    ax.plot(x, [r["acc_full_on_feature_attack"] for r in rows], "-^", ms=3,
            label="full predictor on the f_i-attacked images")
    ax.axhline(summary["chance"], color="gray", ls=":", label="chance")
    ax.axhline(summary["full_predictor"]["acc_clean"], color="k", ls="--", lw=0.8, label="full predictor, clean")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"accuracy per eigen-feature ({summary.get('method', 'pgd').upper()} eps {summary['eps_255']:g}/255)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax = axes[1]
    ax.plot(x, [r["corr_clean"] for r in rows], "-o", ms=3, label="clean")
    ax.plot(x, [r["corr_feature_attacked"] for r in rows], "-s", ms=3, label="under attack on f_i")
    ax.axhline(0, color="gray", ls=":")
    ax.set_ylabel("correlation of f_i(x) with centered labels")
    ax.set_title("usefulness / robustness as label correlation")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    ax = axes[2]
    ev = np.asarray(summary["eigenvalues"])
    ax.plot(np.arange(1, len(ev) + 1), np.where(ev > 0, ev, np.nan), "-", lw=1)
    ax.scatter(x, [r["eigenvalue"] if r["eigenvalue"] > 0 else np.nan for r in rows], s=8, c="C3")
    ax.set_yscale("log")
    ax.set_ylabel("eigenvalue of K(X,X)")
    ax.set_title("spectrum (red: analysed indices)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("eigen-index i (1 = largest eigenvalue)")
        ax.grid(alpha=0.3)
    classes = summary["classes"]
    task = "all classes" if len(classes) == summary["num_classes"] else f"classes {', '.join(map(str, classes))}"
    fig.suptitle(f"NTK eigen-features of {_network_name(summary)}: kernel predictor on {summary['n_train']} "
                 f"training images, {summary['n_test']} test images, {task}", fontsize=12)
    fig.tight_layout()
    return save_fig(fig, path)


def feature_images_figure(summary, images, gradients, path):
    """Per shown eigen-index (a row): the input gradient of f_i at each test image, min-max
    normalised (Tsilivis & Kempe's pictures), titled with its eigenvalue and its clean and
    attacked accuracy; the test images themselves in the first row. Written to `path`."""
    rows = {r["index"]: r for r in summary["features"]}
    shown = summary["feature_images"]["indices"]
    n = len(images)
    fig, axes = plt.subplots(len(shown) + 1, n, figsize=(1.9 * n + 2.2, 1.9 * (len(shown) + 1)), squeeze=False)
    for c in range(n):
        _show_image(axes[0, c], images[c], f"test image {summary['feature_images']['test_images'][c] + 1}")
        for r, i in enumerate(shown, start=1):
            g = gradients[r - 1, c]
            _show_image(axes[r, c], (g - g.min()) / max(g.max() - g.min(), 1e-30), "")
    for r, i in enumerate(shown, start=1):
        row = rows[i]
        axes[r, 0].set_ylabel(f"i={i + 1}  λ={row['eigenvalue']:.3g}\nacc {row['acc_clean']:.2f} / "
                              f"{row['acc_feature_attacked']:.2f}", fontsize=8, rotation=0, ha="right", va="center")
    method = summary.get("method", "pgd").upper()
    fig.suptitle(f"input gradients of the eigen-features of {_network_name(summary)}\n"
                 f"(min-max normalised; acc clean / under {method} eps {summary['eps_255']:g}/255 on f_i)", fontsize=10)
    fig.tight_layout()
    return save_fig(fig, path)


# --------------------------------------------------------------------------------------
# visualize_ntk_features.py
# --------------------------------------------------------------------------------------
def _show_image(ax, image, title):
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def eigen_images_figure(result, title):
    """PNG bytes: row 1 positive images, row 2 negative images (one column per eigenvector,
    titled with eigenvalue and final cosine), the w image on the right, and the eigenvalue
    spectrum on a log scale below."""
    sns.set_theme(style="whitegrid", context="notebook")
    m = len(result["pos_images"])
    fig = plt.figure(figsize=(2.3 * (m + 1) + 0.6, 7.8), constrained_layout=True)
    grid = fig.add_gridspec(3, m + 1, height_ratios=[1, 1, 1.25])
    for i in range(m):
        lam = result["eigenvalues"][i]
        _show_image(fig.add_subplot(grid[0, i]), result["pos_images"][i],
                    f"u{i + 1}+  λ={lam:.3g}\ncos={result['pos_cos'][i]:.3f}")
        _show_image(fig.add_subplot(grid[1, i]), result["neg_images"][i],
                    f"u{i + 1}−  (descent)\ncos={result['neg_cos'][i]:.3f}")
    ridge = result["ridge"]
    target = "Y (one-hot)" if result["class_index"] == -1 else f"y (class {result['class_index']})"
    _show_image(fig.add_subplot(grid[0:2, m]), result["w_image"],
                f"w = K⁻¹{target}{'' if ridge is None else f', ridge {ridge:.2g}'}\ncos={result['w_cos']:.3f}")

    ax = fig.add_subplot(grid[2, :])
    evals = np.asarray(result["eigenvalues"])
    pos = evals > 0
    idx = np.arange(1, len(evals) + 1)
    ax.semilogy(idx[pos], evals[pos], ".-", color=sns.color_palette()[0], lw=1, ms=4, label="eigenvalues")
    ax.semilogy(idx[:m][pos[:m]], evals[:m][pos[:m]], "o", color=sns.color_palette()[3], ms=7,
                label=f"top {m} (drawn above)")
    dropped = int((~pos).sum())
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("kernel eigenvalue spectrum" + (f" ({dropped} non-positive not shown)" if dropped else ""),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
