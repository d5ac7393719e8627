"""Tsilivis & Kempe (NeurIPS 2022) analyses of empirical NTKs, on checkpoints of run_exp.py.

Three subcommands (the math lives in kernel_analysis.py, the kernels come from ntk.py):

  dynamics   How the kernel moves during training. For every `parameters_checkpoint_{e}.pkl`
             of one or more run directories (fractional epochs included, phase-2 `_linear_`
             files excluded), the NTK on ONE fixed class-balanced set of training images; then
             the kernel-distance matrix across checkpoints, the polar dynamics against K_0
             (radius ||K_t-K_0|| / ||K_T-K_0||, angle arccos of the cosine similarity to K_0) of
             the full kernel and of its top-k and bottom-k eigenspaces, the kernel velocity,
             and the fraction of squared eigenvalue mass in the top 10 and top 20. Several
             runs are overlaid in one figure (a CC and an AC run is the paper's experiment).
             Kernels are cached under out_dir/kernel_cache, so a rerun only computes new ones.
  features   The kernel predictor f(x) = K(x,X)(K(X,X) + r I)^-1 Y of a checkpoint's NTK and
             its eigen-features f_i(x) = (lambda_i + r)^-1 K(x,X) u_i u_i^T Y (sum_i f_i = f
             exactly). Per eigen-index: usefulness (clean accuracy and label correlation on
             test images) and robustness (accuracy under an L-inf PGD attack on the feature
             itself, and accuracy of the full predictor on those feature-attacked images).
  attack     Training-free adversarial examples: FGSM or PGD on the input gradient of the
             kernel predictor (K(x,X) is differentiated in x through ntk.cross_kernel). Saves
             them in eval_and_make_adv.py's --test_path format and measures the transfer to
             the checkpoint's network.

Y is the centered one-hot matrix (onehot - 1/C): this leaves the full predictor's argmax
unchanged and keeps the class-independent offset out of the top eigen-features. The ridge is
r = --ridge * mean(diag K), as in visualize_ntk_features.py.

Examples:
  python analyze_ntk.py dynamics --runs /tmp/an_cc /tmp/an_ac --labels CC AC --dataset_size 200 --out_dir /tmp/an_dyn
  python analyze_ntk.py features --model_path /tmp/an_cc/parameters_final.pkl --eps 16 --out_dir /tmp/an_feat
  python analyze_ntk.py attack --model_path /tmp/an_cc/parameters_final.pkl --method pgd --eps 16 --steps 10
"""
from __future__ import annotations

import glob
import os
import re
import time

import numpy as np

import cli
import utils
from utils import UserError

CHECKPOINT_RE = re.compile(r"^parameters_checkpoint_(\d+(?:\.\d+)?)\.pkl$")
MASS_KS = (10, 20)
DYNAMICS_FIGURES = ("polar_dynamics.png", "polar_vs_epoch.png", "eigenvalue_mass.png")


# ======================================================================================
# Arguments
# ======================================================================================
_PREDICTOR_MEMORY_HELP = ("not used by this subcommand (accepted so one command line serves all three): the kernel "
                          "predictor keeps the gradients of all --n_train images in memory")


def _add_common(p, memory_help=None):
    cli.add_network_args(p)
    cli.add_class_index(p)
    p.add_argument("--random_seed", type=cli.seed, default=0, help="seed of the image subsets and attack noise")
    cli.add_memory_gb(p, memory_help)
    p.add_argument("--out_dir", default=None, help="directory for the outputs (created)")
    cli.add_no_progress(p)


def _add_predictor(p):
    p.add_argument("--model_path", required=True, help="checkpoint whose NTK defines the kernel predictor")
    p.add_argument("--use_linear_params", action="store_true",
                   help="evaluate the kernel at 'lin_params' instead of 'params' (in a phase-1 checkpoint: "
                        "the initial parameters, with the checkpoint's BatchNorm statistics)")
    p.add_argument("--n_train", type=int, default=200,
                   help="class-balanced training images X of the kernel predictor")
    p.add_argument("--n_test", type=int, default=100, help="class-balanced test images evaluated and attacked")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="restrict the task to these classes (e.g. --classes 3 8 for the paper's binary "
                        "setting); default all")
    p.add_argument("--ridge", type=float, default=1e-4,
                   help="ridge r = RIDGE * mean(diag K(X,X)) added to K(X,X)")
    p.add_argument("--eps", type=float, default=4.0, help="L-inf radius in 1/255 units")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (step size 2 eps / steps)")
    p.add_argument("--batch_size", type=int, default=50, help="test images per attack batch")


EXAMPLES = {
    "dynamics": "python analyze_ntk.py dynamics --runs runs/phase1_CC runs/phase1_AC --labels CC AC "
                "--dataset_size 200 --out_dir runs/dynamics",
    "features": "python analyze_ntk.py features --model_path runs/phase1_AC/parameters_final.pkl --eps 16 "
                "--out_dir runs/features_AC",
    "attack": "python analyze_ntk.py attack --model_path runs/phase1_CC/parameters_final.pkl --method pgd "
              "--eps 16 --steps 10",
}


def _subcommand(sub, name, description):
    return sub.add_parser(name, help=description, description=description,
                          epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=cli.HelpFormatter)


def build_parser():
    p = cli.parser("Tsilivis & Kempe analyses of empirical NTKs: kernel motion across checkpoints "
                   "(dynamics), eigen-feature usefulness/robustness (features), training-free "
                   "kernel-predictor attacks (attack). Each subcommand has its own flags: "
                   "python analyze_ntk.py SUBCOMMAND --help lists them.", list(EXAMPLES.values()))
    sub = p.add_subparsers(dest="command", required=True, metavar="{dynamics,features,attack}")

    d = _subcommand(sub, "dynamics", "kernel motion across the checkpoints of one or more runs")
    d.add_argument("--runs", nargs="+", default=None,
                   help="run directories holding parameters_checkpoint_{epoch}.pkl (run_exp.py --constant_save)")
    d.add_argument("--kernel_files", nargs="+", action="append", default=None,
                   help="instead of --runs: kernel files of calculate_kernel.py, one run per use of the "
                        "flag, ordered by the epoch of their checkpoint")
    d.add_argument("--labels", nargs="+", default=None, help="one label per run (default: directory names)")
    d.add_argument("--dataset_size", type=int, default=200,
                   help="class-balanced training images of every kernel (the same images for all checkpoints)")
    d.add_argument("--k", type=int, default=10, help="size of the top-k and bottom-k eigenspaces")
    _add_common(d)

    f = _subcommand(sub, "features", "usefulness and robustness of the NTK eigen-features")
    _add_predictor(f)
    f.add_argument("--n_features", type=int, default=20, help="leading eigen-indices analysed (0 .. n_features-1)")
    f.add_argument("--n_tail", type=int, default=10,
                   help="further eigen-indices, log-spaced from n_features to the last (smallest eigenvalue)")
    _add_common(f, _PREDICTOR_MEMORY_HELP)

    a = _subcommand(sub, "attack", "FGSM/PGD adversarial examples of the kernel predictor")
    _add_predictor(a)
    a.add_argument("--method", default="pgd", choices=("fgsm", "pgd"), help="attack")
    a.add_argument("--save_name", default="ntk", help="outputs: adv_examples_{save_name}.pkl, ntk_attack_{save_name}.json")
    a.add_argument("--no_transfer", action="store_true",
                   help="skip evaluating the checkpoint's network on the saved examples")
    _add_common(a, _PREDICTOR_MEMORY_HELP)
    return p


# ======================================================================================
# Shared helpers
# ======================================================================================
def _progress(args, **kw):
    from tqdm import tqdm
    return tqdm(disable=args.no_progress, **kw)


def checkpoint_epoch(path):
    """The epoch in a `parameters_checkpoint_{epoch}.pkl` name as a float, else None."""
    m = CHECKPOINT_RE.match(os.path.basename(path))
    return float(m.group(1)) if m else None


def list_checkpoints(run_dir):
    """[(epoch, path)] of a run directory's phase-1 checkpoints, by increasing epoch."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--runs {run_dir} is not a directory")
    found = []
    for path in glob.glob(os.path.join(run_dir, "parameters_checkpoint_*.pkl")):
        e = checkpoint_epoch(path)
        if e is not None:
            found.append((e, path))
    if len(found) < 2:
        raise UserError(f"{run_dir} holds {len(found)} parameters_checkpoint_{{epoch}}.pkl files; need at least 2 "
                        f"(train with run_exp.py --constant_save)")
    return sorted(found)


def open_network(path, args):
    """The checkpoint at `path` as a checkpoints.Network, with the flags' model/width/dataset."""
    import checkpoints
    return checkpoints.open_network(path, model=args.model, width=args.width, dataset=args.dataset)


def _class_index(args):
    return None if args.class_index == -1 else args.class_index


def _load_data(name, data_dir, input_shape):
    import data
    ds = data.load_dataset(name, data_dir)
    if tuple(ds.input_shape) != tuple(input_shape):
        raise UserError(f"{name} images are {ds.input_shape} but the checkpoint takes {input_shape}")
    return ds


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


# Flags that do not change what an analysis computes.
NOT_INPUTS = ("out_dir", "no_progress", "memory_gb", "data_dir", "save_name")


def analysis_inputs(args, **resolved):
    """What an analysis' outputs are made from: its flags (paths absolute), recorded in its JSON as
    'inputs' so that a rerun with the same inputs may replace the outputs and other inputs may not."""
    inputs = {k: v for k, v in vars(args).items() if k not in NOT_INPUTS}
    if getattr(args, "model_path", None) is not None:
        inputs["model_path"] = os.path.abspath(args.model_path)
    if getattr(args, "runs", None) is not None:
        inputs["runs"] = [os.path.abspath(r) for r in args.runs]
    if getattr(args, "kernel_files", None) is not None:
        inputs["kernel_files"] = [[os.path.abspath(f) for f in files] for files in args.kernel_files]
    inputs.update(resolved)
    return inputs


def check_outputs(files, json_path, inputs, what):
    """Refuse to replace `files` (or `json_path`) made from other inputs (utils.check_replace)."""
    import json
    existing = utils.existing_files([json_path] + [f for f in files if f != json_path])
    recorded = None
    if existing:
        try:
            with open(json_path) as f:
                recorded = json.load(f).get("inputs")
        except (OSError, ValueError, AttributeError):
            pass
    utils.check_replace(existing, recorded, inputs, what, "give another --out_dir, or delete those files")


def _save_fig(fig, path):
    import io
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    utils.atomic_write_bytes(path, buf.getvalue())
    return path


# ======================================================================================
# dynamics
# ======================================================================================
def _safe(label):
    """A run label as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def _cache_path(cache_dir, label, epoch, class_index, n):
    return os.path.join(cache_dir, _safe(label), f"kernel_epoch_{epoch:g}{cli.class_suffix(class_index, n)}.pkl")


def _cached_kernel(path, model_path, indices, class_index, dataset):
    """The cached kernel at `path` if it was made from this very checkpoint file (path, size,
    mtime) on these images, else None."""
    if not os.path.isfile(path):
        return None
    try:
        obj = utils.restricted_load(path)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    st = os.stat(model_path)
    ok = (isinstance(obj, dict) and obj.get("model_path") == os.path.abspath(model_path)
          and obj.get("model_size") == st.st_size and obj.get("model_mtime_ns") == st.st_mtime_ns
          and obj.get("class_index") == class_index and obj.get("dataset") == dataset
          and np.array_equal(np.asarray(obj.get("indices")), indices))
    return np.asarray(obj["kernel"], np.float64) if ok else None


def _run_kernels_from_checkpoints(args, label, run_dir, cache_dir, subset, bar):
    """Kernels of every checkpoint of one run, on the fixed subset; cached. Returns
    (epochs, paths, kernels, n_computed)."""
    import jax.numpy as jnp

    import ntk
    x_sub, y_sub, indices, dataset = subset
    epochs, paths, kernels, computed = [], [], [], 0
    for epoch, path in list_checkpoints(run_dir):
        cache = _cache_path(cache_dir, label, epoch, args.class_index, len(indices))
        k = _cached_kernel(cache, path, indices, args.class_index, dataset)
        if k is None:
            net = open_network(path, args)
            f, params = net.kernel_fn()
            t0 = time.time()
            k = np.asarray(ntk.empirical_ntk(f, params, jnp.asarray(x_sub), class_index=_class_index(args),
                                            memory_gb=args.memory_gb), np.float64)
            st = os.stat(path)
            utils.atomic_pickle(cache, {
                "kernel": k, "labels": y_sub, "indices": indices, "dataset": dataset,
                "class_index": args.class_index, "model": net.model, "width": net.width,
                "num_classes": net.num_classes, "model_path": os.path.abspath(path), "use_linear_params": False,
                "random_seed": args.random_seed, "dataset_size": len(indices), "epoch": epoch,
                "model_size": st.st_size, "model_mtime_ns": st.st_mtime_ns, "seconds": time.time() - t0})
            computed += 1
        epochs.append(epoch)
        paths.append(path)
        kernels.append(k)
        bar.update(1)
    return epochs, paths, kernels, computed


def _run_kernels_from_files(files):
    """Kernels of one run from kernel files, ordered by their epoch. Returns (epochs, paths, kernels)."""
    rows = []
    indices0 = None
    for pos, path in enumerate(files):
        utils.check_file(path, "--kernel_files", "a kernel file", hints=("saved_kernel*.pkl", "*.pkl"))
        obj = utils.restricted_load(path)
        if not isinstance(obj, dict) or "kernel" not in obj:
            raise UserError(f"--kernel_files {path} is not a kernel file (no 'kernel')")
        k = np.asarray(obj["kernel"], np.float64)
        if k.ndim != 2 or k.shape[0] != k.shape[1]:
            raise UserError(f"--kernel_files {path}: the kernel is not square ({k.shape})")
        if indices0 is None:
            indices0 = obj.get("indices")
        elif obj.get("indices") is not None and not np.array_equal(obj["indices"], indices0):
            raise UserError(f"--kernel_files {path} was computed on other images than {files[0]}; kernels of "
                            f"one run must share their images (same --dataset_size and --random_seed)")
        epoch = obj.get("epoch")
        if epoch is None:
            epoch = checkpoint_epoch(str(obj.get("model_path", "")))
        rows.append((float(pos) if epoch is None else float(epoch), pos, path, k))
    rows.sort(key=lambda r: (r[0], r[1]))
    shapes = {r[3].shape for r in rows}
    if len(shapes) != 1:
        raise UserError(f"kernels of one run must have the same size; got {sorted(shapes)}")
    return [r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows]


def analyse_run(epochs, kernels, k_count):
    """Every number of one run: distance matrix, polar dynamics (full/top-k/bottom-k),
    velocity, eigenvalue masses and spectra."""
    import kernel_analysis as ka
    spectra = [ka.eigh_desc(k)[0] for k in kernels]
    dist = ka.distance_matrix(kernels)
    velocity = [None] + [float(dist[t - 1, t] / (epochs[t] - epochs[t - 1])) if epochs[t] > epochs[t - 1] else None
                         for t in range(1, len(epochs))]
    return {
        "epochs": list(map(float, epochs)),
        "distance_matrix": dist.tolist(),
        "distance_to_init": dist[0].tolist(),
        "velocity": velocity,
        "polar": ka.eigenspace_polar_dynamics(kernels, k_count),
        "mass": {f"top{m}": [ka.eigenvalue_mass(s, m) for s in spectra] for m in MASS_KS},
        "frobenius_norm": [float(np.linalg.norm(k)) for k in kernels],
        "trace": [float(np.trace(k)) for k in kernels],
        "eigenvalues_top": [s[:max(MASS_KS)].tolist() for s in spectra],
    }


def _dynamics_figures(results, k_count, out_dir):
    """The figures of `dynamics`; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    parts = (("full", "full kernel"), ("top", f"top-{k_count} eigenspace"), ("bottom", f"bottom-{k_count} eigenspace"))
    return (_distance_figures(results, out_dir) + [_polar_figure(results, parts, out_dir),
                                                    _polar_vs_epoch_figure(results, parts, out_dir),
                                                    _mass_figure(results, out_dir)])


def _colors():
    import matplotlib.pyplot as plt
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _all_epochs(results):
    return sorted({e for r in results.values() for e in r["epochs"]})


def _distance_figures(results, out_dir):
    import matplotlib.pyplot as plt
    import seaborn as sns
    files = []
    # One colour scale for every run's distance matrix, so the figures compare.
    vmax = max(float(np.max(r["distance_matrix"])) for r in results.values()) or 1.0
    shared = len(results) > 1
    for label, r in results.items():
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
        ticks = [f"{e:g}" for e in r["epochs"]]
        sns.heatmap(np.asarray(r["distance_matrix"]), ax=ax, xticklabels=ticks, yticklabels=ticks,
                    cmap="viridis", square=True, vmin=0.0, vmax=vmax,
                    cbar_kws={"label": "kernel distance d(K_s, K_t)" + (" (scale shared by all runs)" if shared else "")})
        ax.set_xlabel("epoch")
        ax.set_ylabel("epoch")
        ax.set_title(f"{label}: kernel distance across checkpoints")
        files.append(_save_fig(fig, os.path.join(out_dir, f"kernel_distance_{_safe(label)}.png")))
    return files


def _polar_figure(results, parts, out_dir):
    """Angle = arccos(similarity to K_0), radius = normalised distance from K_0."""
    import matplotlib.pyplot as plt
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
    return _save_fig(fig, os.path.join(out_dir, "polar_dynamics.png"))


def _polar_vs_epoch_figure(results, parts, out_dir):
    import matplotlib.pyplot as plt
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
    return _save_fig(fig, os.path.join(out_dir, "polar_vs_epoch.png"))


def _mass_figure(results, out_dir):
    import matplotlib.pyplot as plt
    colors, all_epochs = _colors(), _all_epochs(results)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4))
    for i, (label, r) in enumerate(results.items()):
        c = colors[i % len(colors)]
        for j, m in enumerate(MASS_KS):
            axes[j].plot(r["epochs"], r["mass"][f"top{m}"], "-o", ms=3, color=c, label=label)
        axes[2].plot(r["epochs"], r["distance_to_init"], "-o", ms=3, color=c, label=label)
        v = [(e, x) for e, x in zip(r["epochs"], r["velocity"]) if x is not None and x > 0]  # log axis
        axes[3].plot([e for e, _ in v], [x for _, x in v], "-o", ms=3, color=c, label=label)
    for j, m in enumerate(MASS_KS):
        axes[j].set_title(f"top-{m} eigenvalue mass")
        axes[j].set_ylabel(rf"$\sum_{{i \leq {m}}} \lambda_i^2 \,/\, \sum_i \lambda_i^2$")
        axes[j].set_ylim(0, 1.02)
    axes[2].set_title("kernel distance to K_0")
    axes[2].set_ylabel("d(K_0, K_t)")
    axes[3].set_title("kernel velocity")
    axes[3].set_ylabel("d(K_t-1, K_t) / (epoch_t - epoch_t-1)")
    axes[3].set_yscale("log")
    for ax in axes:
        _epoch_axis(ax, all_epochs)
    axes[0].legend()
    fig.tight_layout()
    return _save_fig(fig, os.path.join(out_dir, "eigenvalue_mass.png"))


def _dynamics_labels(args):
    """One distinct label per run, checked with the other flags of `dynamics`."""
    if (args.runs is None) == (args.kernel_files is None):
        raise UserError("give exactly one of --runs and --kernel_files")
    if args.k <= 0:
        raise UserError(f"--k must be positive (got {args.k})")
    sources = args.runs if args.runs is not None else args.kernel_files
    if args.labels is not None:
        if len(args.labels) != len(sources):
            raise UserError(f"--labels has {len(args.labels)} names for {len(sources)} runs")
        labels = list(args.labels)
    elif args.runs is not None:
        labels = [os.path.basename(os.path.normpath(r)) for r in args.runs]
    else:
        labels = [f"run{i}" for i in range(len(sources))]
    if len(set(labels)) != len(labels):
        raise UserError(f"runs need distinct labels (got {labels}); pass --labels")
    return labels


def _kernels_of_runs(args, labels, check_out_dir):
    """The analysed kernels of every checkpoint of --runs, on one fixed image subset (cached).
    Returns (results by label, kernels computed)."""
    import data
    ckpt_lists = [list_checkpoints(r) for r in args.runs]  # every run checked before any work
    first = open_network(ckpt_lists[0][0][1], args)
    cli.check_class_index(args.class_index, first.num_classes, first.dataset)
    if args.dataset_size <= 0 or args.dataset_size % first.num_classes:
        raise UserError(f"--dataset_size must be a positive multiple of the class count "
                        f"{first.num_classes} (got {args.dataset_size})")
    ds = _load_data(first.dataset, args.data_dir, first.input_shape)
    x_sub, y_sub, indices = data.balanced_subset(ds.x_train, ds.y_train, args.dataset_size, args.random_seed,
                                                 ds.num_classes, "--dataset_size")
    subset = (x_sub, y_sub, indices, first.dataset)
    check_out_dir()
    cache_dir = os.path.join(args.out_dir or "ntk_analysis", "kernel_cache")
    total, computed, results = sum(len(c) for c in ckpt_lists), 0, {}
    with _progress(args, total=total, desc="kernels", unit="ckpt") as bar:
        for label, run_dir in zip(labels, args.runs):
            epochs, paths, kernels, n_new = _run_kernels_from_checkpoints(args, label, run_dir, cache_dir,
                                                                          subset, bar)
            computed += n_new
            results[label] = {"source": os.path.abspath(run_dir), "checkpoints": paths,
                              **analyse_run(epochs, kernels, min(args.k, len(indices)))}
    print(f"{computed} kernels computed, {total - computed} reused from {cache_dir}")
    return results, computed


def _print_dynamics(results):
    for label, r in results.items():
        e = r["epochs"]
        half = next((ep for ep, rad in zip(e, r["polar"]["full"]["radius"]) if rad >= 0.5), None)
        print(f"{label}: {len(e)} checkpoints (epochs {e[0]:g}..{e[-1]:g}); final d(K_0, K_T) = "
              f"{r['distance_to_init'][-1]:.4f}; half of the final radius reached at epoch {half}; "
              f"top-10 mass {r['mass']['top10'][0]:.3f} -> {r['mass']['top10'][-1]:.3f}")
        norms = r["frobenius_norm"]
        if len(norms) > 1 and norms[0] > 100 * np.median(norms[1:]):
            print(f"note ({label}): |K_0|_F is {norms[0] / np.median(norms[1:]):.3g} times the median of the later "
                  "kernels (with BatchNorm, the epoch-0 kernel uses initial running statistics), so |K_t - K_0| is "
                  "about |K_0| at every t and the radius stays near 1; the angle and the kernel distance are "
                  "scale-free and remain informative")


def run_dynamics(args):
    labels = _dynamics_labels(args)
    out_dir = args.out_dir or "ntk_analysis"
    figure_names = [f"kernel_distance_{_safe(label)}.png" for label in labels] + list(DYNAMICS_FIGURES)
    json_path = os.path.join(out_dir, "dynamics.json")

    def check_out_dir():
        check_outputs([os.path.join(out_dir, f) for f in figure_names], json_path,
                      analysis_inputs(args, labels=labels), "a kernel-dynamics analysis")
        utils.check_writable_dir(out_dir, "--out_dir")

    results, computed = {}, 0
    if args.runs is not None:
        results, computed = _kernels_of_runs(args, labels, check_out_dir)
    else:
        loaded = []
        for label, files in zip(labels, args.kernel_files):
            epochs, paths, kernels = _run_kernels_from_files(files)
            if len(kernels) < 2:
                raise UserError(f"run {label} has {len(kernels)} kernel file; need at least 2")
            loaded.append((label, epochs, paths, kernels))
        check_out_dir()
        for label, epochs, paths, kernels in loaded:
            results[label] = {"source": "kernel_files", "checkpoints": paths,
                              **analyse_run(epochs, kernels, min(args.k, len(kernels[0])))}

    files = _dynamics_figures(results, args.k, out_dir)
    summary = {"command": "dynamics", "config": utils.run_config(args), "k": args.k,
               "kernels_computed": computed,
               "definitions": {
                   "distance": "d(K1,K2) = 1 - <K1,K2>_F / (|K1|_F |K2|_F)",
                   "radius": "|K_t - K_0|_F / |K_T - K_0|_F",
                   "angle": "arccos(<K_t,K_0>_F / (|K_t|_F |K_0|_F)) in radians",
                   "top/bottom": "K_t restricted to its own k largest / smallest eigenvalues (U_k diag(l_k) U_k^T)",
                   "mass_topm": "sum_{i<=m} l_i^2 / sum_i l_i^2",
                   "velocity": "d(K_{t-1}, K_t) / (epoch_t - epoch_{t-1})"},
               "runs": results, "figures": files, "inputs": analysis_inputs(args, labels=labels)}
    utils.atomic_json(json_path, summary)
    _print_dynamics(results)
    for f in files + [json_path]:
        print(f"wrote {f}")
    return summary


# ======================================================================================
# Kernel predictor (features, attack)
# ======================================================================================
class PredictorSetup:
    """Everything a kernel-predictor analysis needs: network, images, kernels, fitted predictor.

    Attributes: net, f, params, x_train [n,H,W,C], y_train [n] (task labels 0..C'-1),
    train_indices, x_test [m,H,W,C], y_test [m] (task labels), test_indices, classes (original
    label of each task class), k_train_train [n,n], k_test_train [m,n], predictor (EigenPredictor),
    ridge (absolute), kernel_vars (ntk.cross_kernel's: parameters, BatchNorm state, X's gradient
    rows), logits_fn ((kernel_vars, weights), x) -> K(x,X) @ weights, jit-stable), kernel_at(x)."""

    def __init__(self, args):
        """Check every input and draw the image subsets (no kernel yet: see `fit`)."""
        import data
        for flag in ("n_train", "n_test", "steps", "batch_size"):
            if getattr(args, flag) <= 0:
                raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
        if not (0 <= args.eps < float("inf") and 0 <= args.ridge < float("inf")):
            raise UserError(f"--eps and --ridge must be finite and >= 0 (got {args.eps:g} and {args.ridge:g})")
        self.net = net = open_network(args.model_path, args)
        cli.check_class_index(args.class_index, net.num_classes, net.dataset)
        classes = list(range(net.num_classes)) if args.classes is None else sorted(set(args.classes))
        if len(classes) < 2 or any(not 0 <= c < net.num_classes for c in classes):
            raise UserError(f"--classes needs at least 2 distinct classes in [0, {net.num_classes - 1}] (got {args.classes})")
        self.classes = np.asarray(classes)
        c = len(classes)
        for flag in ("n_train", "n_test"):
            if getattr(args, flag) % c:
                raise UserError(f"--{flag} {getattr(args, flag)} is not divisible by the number of classes ({c})")
        ds = _load_data(net.dataset, args.data_dir, net.input_shape)

        def task_subset(x, y, size, what):
            pool = np.flatnonzero(np.isin(y, self.classes))
            task_y = np.searchsorted(self.classes, y[pool]).astype(np.int32)
            idx = data.balanced_indices(task_y, size // c, args.random_seed, c)
            return x[pool[idx]], task_y[idx], pool[idx]

        self.x_train, self.y_train, self.train_indices = task_subset(ds.x_train, ds.y_train, args.n_train, "--n_train")
        self.x_test, self.y_test, self.test_indices = task_subset(ds.x_test, ds.y_test, args.n_test, "--n_test")

    def fit(self, args):
        """The kernels K(X,X), K(x_test,X) and the fitted predictor (the work; inputs are checked)."""
        import jax
        import jax.numpy as jnp

        import kernel_analysis as ka
        import ntk
        self.f, self.params = self.net.kernel_fn(args.use_linear_params)
        ci = _class_index(args)
        c = len(self.classes)
        x_ref = jnp.asarray(self.x_train)
        t0 = time.time()
        # X's gradient rows are computed once and kept (ntk.cross_kernel): K(X, X) is their Gram
        # matrix, and every K(x, X) of a test or attacked image reuses them.
        kernel, self.kernel_vars = ntk.cross_kernel(self.f, self.params, x_ref, class_index=ci)
        self._kernel_jit, self.batch_size = jax.jit(kernel), args.batch_size
        logits_summed = len(ntk.classes_of(ci, self.net.num_classes))  # the network's logits, not the task's
        self.k_train_train = ntk.reference_kernel(self.kernel_vars, logits_summed, args.batch_size)  # [n, n]
        self.k_test_train = self.kernel_at(self.x_test)                                             # [m, n]
        self.kernel_seconds = time.time() - t0
        self.ridge = args.ridge * float(np.mean(np.diag(self.k_train_train)))
        try:
            self.predictor = ka.fit_kernel_predictor(self.k_train_train, ka.centered_one_hot(self.y_train, c),
                                                     self.ridge)
        except ValueError as e:
            raise UserError(f"{e} (--ridge)") from None
        self.logits_fn = ka.make_kernel_logits(kernel)

    def kernel_at(self, x):
        """K(x, X) [m, n] float64, in batches of --batch_size (the last one padded)."""
        import parallel
        x = np.asarray(x, np.float32)
        b = self.batch_size
        out = []
        for start in range(0, len(x), b):
            xb = x[start:start + b]   # padded to one compiled shape; the padded rows are dropped
            out.append(np.asarray(self._kernel_jit(self.kernel_vars, parallel.pad_rows(xb, b)), np.float64)[:len(xb)])
        return np.concatenate(out)

    def accuracy(self, k_test_train, weights):
        return float(np.mean(np.argmax(k_test_train @ weights, -1) == self.y_test))

    def attack(self, args, weights, method, key):
        import kernel_analysis as ka
        return ka.attack_kernel_predictor(self.logits_fn, (self.kernel_vars, weights), self.x_test, self.y_test,
                                          method=method,
                                          eps=cli.eps_from_255(args.eps), steps=1 if method == "fgsm" else args.steps,
                                          key=key, batch_size=args.batch_size)

    def describe(self, args):
        return {**self.net.describe(), "use_linear_params": args.use_linear_params,
                "class_index": args.class_index, "classes": self.classes.tolist(),
                "n_train": len(self.y_train), "n_test": len(self.y_test),
                "train_indices": self.train_indices.tolist(), "test_indices": self.test_indices.tolist(),
                "ridge_rel": args.ridge, "ridge_abs": self.ridge, "random_seed": args.random_seed,
                "targets": "centered one-hot (onehot - 1/C)", "kernel_seconds": round(self.kernel_seconds, 2)}


def feature_indices(n, n_features, n_tail):
    """Leading indices 0..n_features-1 plus `n_tail` log-spaced ones up to n-1 (sorted, unique)."""
    head = list(range(min(n_features, n)))
    tail = []
    if n_tail > 0 and n > len(head):
        tail = np.unique(np.round(np.geomspace(max(len(head), 1), n - 1, n_tail)).astype(int)).tolist()
    return sorted(set(head) | set(tail))


def _default_out_dir(args):
    return args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.model_path)), "ntk_analysis")


def run_features(args):
    import jax

    import kernel_analysis as ka
    if args.n_features < 0 or args.n_tail < 0:
        raise UserError("--n_features and --n_tail must be >= 0")
    out_dir = _default_out_dir(args)
    s = PredictorSetup(args)
    fig_path, json_path = os.path.join(out_dir, "eigen_features.png"), os.path.join(out_dir, "eigen_features.json")
    inputs = analysis_inputs(args, model=s.net.model, width=s.net.width, dataset=s.net.dataset)
    check_outputs([fig_path], json_path, inputs, "an eigen-feature analysis")
    utils.check_writable_dir(out_dir, "--out_dir")
    s.fit(args)
    pred = s.predictor
    c = len(s.classes)
    idx = feature_indices(len(s.y_train), args.n_features, args.n_tail)
    if not idx:
        raise UserError("no eigen-index selected (--n_features 0 and --n_tail 0)")
    feats = ka.eigen_features(s.k_test_train, pred, idx)                       # [F, m, C]
    acc_clean, corr_clean = ka.feature_usefulness(feats, s.y_test, c)
    full_clean = s.accuracy(s.k_test_train, pred["alpha"])
    sum_error = float(np.max(np.abs(ka.eigen_features(s.k_test_train, pred).sum(0)
                                    - ka.kernel_predict(s.k_test_train, pred))))
    key = jax.random.PRNGKey(args.random_seed)
    x_adv_full = s.attack(args, pred["alpha"], "pgd", jax.random.fold_in(key, 10 ** 6))
    full_robust = s.accuracy(s.kernel_at(x_adv_full), pred["alpha"])

    acc_feat_adv, corr_feat_adv, acc_full_on_feat_adv = [], [], []
    with _progress(args, total=len(idx), desc="feature attacks", unit="feature") as bar:
        for j, i in enumerate(idx):
            weights = np.outer(pred["evecs"][:, i], pred["coefs"][i])     # [n, C]: f_i = K(x,X) weights
            x_adv = s.attack(args, weights, "pgd", jax.random.fold_in(key, i))
            k_adv = s.kernel_at(x_adv)
            a, r = ka.feature_usefulness(ka.eigen_features(k_adv, pred, [i]), s.y_test, c)
            acc_feat_adv.append(float(a[0]))
            corr_feat_adv.append(float(r[0]))
            acc_full_on_feat_adv.append(s.accuracy(k_adv, pred["alpha"]))
            bar.update(1)

    per_index = [{"index": int(i), "eigenvalue": float(pred["evals"][i]),
                  "acc_clean": float(acc_clean[j]), "corr_clean": float(corr_clean[j]),
                  "acc_feature_attacked": acc_feat_adv[j], "corr_feature_attacked": corr_feat_adv[j],
                  "acc_full_on_feature_attack": acc_full_on_feat_adv[j]} for j, i in enumerate(idx)]
    summary = {"command": "features", "config": utils.run_config(args), **s.describe(args),
               "eps_255": args.eps, "eps": cli.eps_from_255(args.eps), "attack": f"L-inf PGD-{args.steps}, step 2eps/steps, "
               "cross-entropy on the attacked feature's outputs", "chance": 1 / c,
               "full_predictor": {"acc_clean": full_clean, "acc_robust": full_robust},
               "max_abs_sum_of_features_minus_predictor": sum_error,
               "eigenvalues": pred["evals"].tolist(), "features": per_index, "inputs": inputs}
    _features_figure(summary, fig_path)
    summary["figures"] = [fig_path]
    utils.atomic_json(json_path, summary)
    print(f"kernel predictor ({len(s.y_train)} train, {len(s.y_test)} test, classes {s.classes.tolist()}): "
          f"clean {full_clean:.3f}, PGD-{args.steps} eps {args.eps:g}/255 robust {full_robust:.3f}; "
          f"|sum f_i - f| = {sum_error:.2e}")
    print("index  eigenvalue   acc_clean  corr_clean  acc_attacked  full_acc_on_feature_attack")
    for r in per_index:
        print(f"{r['index']:5d}  {r['eigenvalue']:10.4g}  {r['acc_clean']:9.3f}  {r['corr_clean']:10.3f}  "
              f"{r['acc_feature_attacked']:12.3f}  {r['acc_full_on_feature_attack']:10.3f}")
    for f in (fig_path, json_path):
        print(f"wrote {f}")
    return summary


def _network_name(summary):
    """The analysed network in words: its checkpoint (run directory and file) and architecture."""
    path = os.path.normpath(summary["model_path"])
    short = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    arch = summary["model"] + (f" width {summary['width']}" if summary["model"] == "resnet18" else "")
    at = ", at lin_params" if summary.get("use_linear_params") else ""
    return f"{short} ({arch}, {summary['dataset']}{at})"


def _features_figure(summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    ax.set_title(f"accuracy per eigen-feature (PGD eps {summary['eps_255']:g}/255)")
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
    return _save_fig(fig, path)


def run_attack(args):
    import jax

    out_dir = _default_out_dir(args)
    s = PredictorSetup(args)
    adv_path = os.path.join(out_dir, f"adv_examples_{args.save_name}.pkl")
    clean_path = os.path.join(out_dir, f"clean_examples_{args.save_name}.pkl")
    json_path = os.path.join(out_dir, f"ntk_attack_{args.save_name}.json")
    inputs = analysis_inputs(args, model=s.net.model, width=s.net.width, dataset=s.net.dataset)
    check_outputs([adv_path, clean_path], json_path, inputs, "a kernel-predictor attack")
    utils.check_writable_dir(out_dir, "--out_dir")
    s.fit(args)
    pred = s.predictor
    t0 = time.time()
    x_adv = s.attack(args, pred["alpha"], args.method, jax.random.PRNGKey(args.random_seed))
    attack_seconds = time.time() - t0
    k_adv = s.kernel_at(x_adv)
    acc_clean = s.accuracy(s.k_test_train, pred["alpha"])
    acc_robust = s.accuracy(k_adv, pred["alpha"])
    linf = float(np.max(np.abs(x_adv - s.x_test)))
    labels = s.classes[s.y_test]  # the network's own labels, not the task's 0..C'-1
    utils.atomic_pickle(adv_path, {"images": np.ascontiguousarray(x_adv.transpose(0, 3, 1, 2)), "labels": labels})
    utils.atomic_pickle(clean_path, {"images": np.ascontiguousarray(s.x_test.transpose(0, 3, 1, 2)), "labels": labels})
    command = (f"python eval_and_make_adv.py --model_path {args.model_path} --test_path {adv_path} --no_adv "
               f"--save_name transfer_{args.save_name}")
    summary = {"command": "attack", "config": utils.run_config(args), **s.describe(args),
               "method": args.method, "eps_255": args.eps, "eps": cli.eps_from_255(args.eps),
               "steps": 1 if args.method == "fgsm" else args.steps,
               "step_size": cli.eps_from_255(args.eps) * (1 if args.method == "fgsm" else 2 / args.steps),
               "kernel_predictor": {"acc_clean": acc_clean, "acc_robust": acc_robust},
               "max_linf_perturbation": linf, "attack_seconds": round(attack_seconds, 2),
               "files": {"adv_examples": adv_path, "clean_examples": clean_path}, "transfer_command": command,
               "inputs": inputs}
    if not args.no_transfer:
        summary["network_transfer"] = _transfer(s, x_adv)
    utils.atomic_json(json_path, summary)
    print(f"kernel predictor on {len(labels)} test images: clean {acc_clean:.3f}, "
          f"{args.method.upper()} eps {args.eps:g}/255 robust {acc_robust:.3f} (max |delta| = {linf * 255:.2f}/255)")
    if "network_transfer" in summary:
        t = summary["network_transfer"]
        print(f"network ({args.model_path}) on the same images: clean {t['acc_clean']:.3f}, "
              f"on the NTK examples {t['acc_on_ntk_examples']:.3f}")
    print(f"wrote {adv_path}\nwrote {clean_path}\nwrote {json_path}")
    print(f"transfer to any network with the same input shape:\n  {command}")
    return summary


def _transfer(s, x_adv):
    """The checkpoint's network (standard dynamics, 'params') on the clean test images and on
    their NTK-attacked versions, through attacks.evaluate without an attack of its own."""
    import jax.numpy as jnp

    import attacks
    labels = s.classes[s.y_test]  # the network's own labels, not the task's 0..C'-1
    theta, theta0 = s.net.parameters("standard")
    predict = attacks.make_predict(s.net.apply, "standard")
    variables = (theta, theta0, s.net.ckpt["net_state"])
    accs = {name: attacks.evaluate(predict, variables, x, labels, attack=None)["acc_clean"]
            for name, x in (("clean", s.x_test), ("adv", jnp.asarray(x_adv)))}
    return {"acc_clean": accs["clean"], "acc_on_ntk_examples": accs["adv"],
            "evaluated_with": "attacks.evaluate without attack (standard dynamics, 'params'), as "
                              "eval_and_make_adv.py --test_path ... --no_adv"}


# ======================================================================================
def run(args):
    """Dispatch to the subcommand. Returns its summary dict (also written as JSON)."""
    return {"dynamics": run_dynamics, "features": run_features, "attack": run_attack}[args.command](args)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return utils.run_main(run, args)


if __name__ == "__main__":
    main()
