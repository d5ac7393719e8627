"""What the NTK analyses read: checkpoints opened with the command line's overrides, their
dataset, the checkpoints of a run directory and their kernels, and kernel files.

* `open_network`, `load_data`: a checkpoint as a `checkpoints.Network` with the flags' model,
  width and dataset, and that dataset (its images must have the network's input shape).
* Kernel motion (analyze_ntk.py dynamics): the `parameters_checkpoint_{epoch}.pkl` files of a
  run directory (`list_checkpoints`), the NTK of each on ONE fixed class-balanced subset of
  training images, cached per checkpoint (`checkpoint_kernels`), or a run's kernels read from
  calculate_kernel.py files (`kernels_from_files`). With --full every kernel is the full NTK of
  all class pairs, handed on as its C n x C n class-major matrix (ntk.full_matrix).
* `load_kernel_file`: a calculate_kernel.py file, checked to record the images, class and
  network it was computed on (visualize_ntk_features.py; a full kernel, calculate_kernel.py
  --full, is refused there); `KernelNetwork`: an infinite-width kernel file in the place of a
  checkpoint's network there.

A cached kernel is reused only when it was made from the very same checkpoint file (absolute
path, size and modification time) on the same images and class; anything else is recomputed.
"""
from __future__ import annotations

import glob
import os
import re
import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import checkpoints
import cli
import data
import infinite
import ntk
import tangent_features
import utils
from utils import UserError

CHECKPOINT_RE = re.compile(r"^parameters_checkpoint_(\d+(?:\.\d+)?)\.pkl$")
# The keys a kernel file needs to say which images, class and network it was computed on.
KERNEL_KEYS = ("kernel", "labels", "indices", "dataset", "class_index", "model", "width",
               "num_classes", "use_linear_params", "dataset_size")


# --------------------------------------------------------------------------------------
# Networks and data
# --------------------------------------------------------------------------------------
def open_network(path, args):
    """The checkpoint at `path` as a checkpoints.Network, with the flags' model/width/dataset."""
    return checkpoints.open_network(path, model=args.model, width=args.width, dataset=args.dataset)


def load_data(name, data_dir, input_shape):
    """Dataset `name`, whose images must have the checkpoint's `input_shape`."""
    ds = data.load_dataset(name, data_dir)
    if tuple(ds.input_shape) != tuple(input_shape):
        raise UserError(f"{name} images are {ds.input_shape} but the checkpoint takes {input_shape}")
    return ds


# --------------------------------------------------------------------------------------
# The checkpoints of a run and their kernels
# --------------------------------------------------------------------------------------
class ImageSubset(NamedTuple):
    """The fixed training images on which every kernel of `dynamics` is computed."""
    x: np.ndarray         # [n, H, W, C]
    labels: np.ndarray    # [n]
    indices: np.ndarray   # [n] into the dataset's training split
    dataset: str


def checkpoint_epoch(path):
    """The epoch in a `parameters_checkpoint_{epoch}.pkl` name as a float, else None."""
    m = CHECKPOINT_RE.match(os.path.basename(path))
    return float(m.group(1)) if m else None


def list_checkpoints(run_dir, max_epoch=None):
    """[(epoch, path)] of a run directory's phase-1 checkpoints (up to `max_epoch`), by increasing epoch."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--runs {run_dir} is not a directory")
    found = []
    for path in glob.glob(os.path.join(run_dir, "parameters_checkpoint_*.pkl")):
        e = checkpoint_epoch(path)
        if e is not None and (max_epoch is None or e <= max_epoch):
            found.append((e, path))
    if len(found) < 2:
        upto = "" if max_epoch is None else f" up to epoch {max_epoch:g} (--max_epoch)"
        raise UserError(f"{run_dir} holds {len(found)} parameters_checkpoint_{{epoch}}.pkl files{upto}; need at "
                        f"least 2 (train with run_exp.py --constant_save)")
    return sorted(found)


def open_runs(args):
    """Check --runs and the flags of `dynamics` against the first checkpoint, before any work.
    Returns ([(epoch, path)] of every run, the ImageSubset of --dataset_size training images)."""
    ckpt_lists = [list_checkpoints(r, args.max_epoch) for r in args.runs]  # every run checked before any work
    first = open_network(ckpt_lists[0][0][1], args)
    cli.check_class_index(args.class_index, first.num_classes, first.dataset)
    if args.dataset_size <= 0 or args.dataset_size % first.num_classes:
        raise UserError(f"--dataset_size must be a positive multiple of the class count "
                        f"{first.num_classes} (got {args.dataset_size})")
    ds = load_data(first.dataset, args.data_dir, first.input_shape)
    x, labels, indices = data.balanced_subset(ds.x_train, ds.y_train, args.dataset_size, args.random_seed,
                                              ds.num_classes, "--dataset_size")
    return ckpt_lists, ImageSubset(x, labels, indices, first.dataset)


def _cache_path(run_cache_dir, epoch, class_index, n, full=False):
    return os.path.join(run_cache_dir, f"kernel_epoch_{epoch:g}{cli.class_suffix(class_index, n, full)}.pkl")


def _kernel_matrix(obj, full):
    """A kernel file's kernel as the matrix the motion analysis reads: [n, n], or a full kernel's
    [n, n, C, C] as its C n x C n class-major matrix (ntk.full_matrix)."""
    kernel = np.asarray(obj["kernel"], np.float64)
    return ntk.full_matrix(kernel) if full else kernel


def _cached_kernel(path, model_path, indices, class_index, dataset, full=False):
    """The cached kernel at `path` if it was made from this very checkpoint (its contents, wherever
    the run folder now lies) on these images, of this kind (full or not), else None; a full
    kernel comes as its class-major matrix."""
    if not os.path.isfile(path):
        return None
    try:
        obj = utils.restricted_load(path)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None
    ok = (isinstance(obj, dict) and isinstance(obj.get("model_file"), dict)
          and utils.same_input(obj["model_file"], utils.file_record(model_path))
          and obj.get("class_index") == class_index and obj.get("dataset") == dataset
          and bool(obj.get("full", False)) == bool(full) and np.ndim(obj.get("kernel")) == (4 if full else 2)
          and np.array_equal(np.asarray(obj.get("indices")), indices))
    return _kernel_matrix(obj, full) if ok else None


def _compute_kernel(args, epoch, path, subset, cache):
    """The NTK of the checkpoint at `path` on `subset`, float64; written to `cache` with what it
    was made from. With --full the full kernel [n, n, C, C] is cached (as calculate_kernel.py
    --full writes it) and its class-major matrix returned."""
    full = bool(getattr(args, "full", False))
    net = open_network(path, args)
    f, params = net.kernel_fn()
    t0 = time.time()
    kernel = np.asarray(ntk.empirical_ntk(f, params, jnp.asarray(subset.x), class_index=args.class_index,
                                         memory_gb=args.memory_gb, full=full), np.float64)
    record = {
        "kernel": kernel, "labels": subset.labels, "indices": subset.indices, "dataset": subset.dataset,
        "class_index": args.class_index, "model": net.model, "width": net.width,
        "num_classes": net.num_classes, "model_path": os.path.abspath(path), "use_linear_params": False,
        "random_seed": args.random_seed, "dataset_size": len(subset.indices), "epoch": epoch,
        "model_file": utils.file_record(path), "seconds": time.time() - t0}
    if full:
        record["full"] = True
    utils.atomic_pickle(cache, record)
    return ntk.full_matrix(kernel) if full else kernel


def checkpoint_kernels(args, ckpt_lists, subset, cache_dirs):
    """The kernel of every checkpoint of every run on `subset`, cached in the run's directory of
    `cache_dirs`. Returns ([(epochs, paths, kernels)] per run, number of kernels computed)."""
    runs, computed = [], 0
    full = bool(getattr(args, "full", False))
    with tqdm(total=sum(len(c) for c in ckpt_lists), desc="kernels", unit="ckpt", disable=args.no_progress) as bar:
        for ckpts, run_cache_dir in zip(ckpt_lists, cache_dirs):
            kernels = []
            for epoch, path in ckpts:
                cache = _cache_path(run_cache_dir, epoch, args.class_index, len(subset.indices), full)
                kernel = _cached_kernel(cache, path, subset.indices, args.class_index, subset.dataset, full)
                if kernel is None:
                    kernel = _compute_kernel(args, epoch, path, subset, cache)
                    computed += 1
                kernels.append(kernel)
                bar.update(1)
            runs.append(([e for e, _ in ckpts], [p for _, p in ckpts], kernels))
    return runs, computed


def _is_full(obj):
    """Whether a kernel file holds a full kernel (calculate_kernel.py --full: [n, n, C, C])."""
    return bool(obj.get("full", False)) or np.ndim(obj.get("kernel")) == 4


def _run_kernels_from_files(files, full=False):
    """Kernels of one run from kernel files, ordered by their epoch. Returns (epochs, paths, kernels).
    With `full` every file must hold a full kernel, handed on as its class-major matrix; without,
    a full kernel is refused."""
    rows = []
    indices0 = None
    for pos, path in enumerate(files):
        utils.check_file(path, "--kernel_files", "a kernel file", hints=("saved_kernel*.pkl", "*.pkl"))
        obj = utils.restricted_load(path)
        if not isinstance(obj, dict) or "kernel" not in obj:
            raise UserError(f"--kernel_files {path} is not a kernel file (no 'kernel')")
        if _is_full(obj) != bool(full):
            raise UserError(f"--kernel_files {path} holds a full kernel of every class pair (calculate_kernel.py "
                            f"--full): analyse it with --full" if not full else
                            f"--kernel_files {path} is not a full kernel: --full reads files of calculate_kernel.py "
                            f"--full (every class pair)")
        shape = np.shape(obj["kernel"])
        if (len(shape) != 4 or shape[0] != shape[1] or shape[2] != shape[3]) if full else \
                (len(shape) != 2 or shape[0] != shape[1]):
            raise UserError(f"--kernel_files {path}: the kernel is not {'[n, n, C, C]' if full else 'square'} "
                            f"({shape})")
        kernel = _kernel_matrix(obj, full)
        del obj["kernel"]
        if indices0 is None:
            indices0 = obj.get("indices")
        elif obj.get("indices") is not None and not np.array_equal(obj["indices"], indices0):
            raise UserError(f"--kernel_files {path} was computed on other images than {files[0]}; kernels of "
                            f"one run must share their images (same --dataset_size and --random_seed)")
        epoch = obj.get("epoch")
        if epoch is None:
            epoch = checkpoint_epoch(str(obj.get("model_path", "")))
        rows.append((float(pos) if epoch is None else float(epoch), pos, path, kernel))
    rows.sort(key=lambda r: (r[0], r[1]))
    shapes = {r[3].shape for r in rows}
    if len(shapes) != 1:
        raise UserError(f"kernels of one run must have the same size; got {sorted(shapes)}")
    return [r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows]


def kernels_from_files(labels, kernel_files, full=False):
    """[(epochs, paths, kernels)] of every run from its kernel files (at least 2 per run); with
    `full`, full kernels (calculate_kernel.py --full) as their class-major matrices."""
    runs = []
    for label, files in zip(labels, kernel_files):
        epochs, paths, kernels = _run_kernels_from_files(files, full)
        if len(kernels) < 2:
            raise UserError(f"run {label} has {len(kernels)} kernel file; need at least 2")
        runs.append((epochs, paths, kernels))
    return runs


# --------------------------------------------------------------------------------------
# Kernel files of calculate_kernel.py
# --------------------------------------------------------------------------------------
def load_kernel_file(path):
    """Load and check a calculate_kernel.py file; returns its dict with numpy arrays."""
    if not path:
        raise UserError("--kernel_path is required")
    if not os.path.lexists(path):
        raise UserError(f"kernel file not found: {path} (make it with calculate_kernel.py)")
    utils.check_file(path, "--kernel_path", "a kernel file", hints=("saved_kernel*.pkl", "*.pkl"))
    obj = utils.decode_keys(utils.restricted_load(path))
    if not isinstance(obj, dict) or "kernel" not in obj:
        raise UserError(f"{path} is not a kernel file: it has no 'kernel'")
    missing = [k for k in KERNEL_KEYS if k not in obj]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: only kernel files written by this "
                        f"project's calculate_kernel.py record which images they were computed on")
    if obj.get("full") or np.ndim(obj["kernel"]) == 4:
        raise UserError(f"{path} holds a full kernel of every class pair ([n, n, C, C], calculate_kernel.py --full); "
                        f"the eigen-images need a one-logit or mean kernel [n, n]: make one without --full")
    kernel = np.asarray(obj["kernel"], dtype=np.float64)
    n = len(kernel)
    if kernel.shape != (n, n) or n == 0:
        raise UserError(f"{path}: 'kernel' has shape {kernel.shape}, expected a non-empty square matrix")
    if not np.all(np.isfinite(kernel)):
        raise UserError(f"{path}: the kernel holds non-finite values")
    obj["kernel"] = kernel
    obj["labels"] = np.asarray(obj["labels"]).astype(np.int64)
    obj["indices"] = np.asarray(obj["indices"]).astype(np.int64)
    if obj["labels"].shape != (n,) or obj["indices"].shape != (n,):
        raise UserError(f"{path}: 'labels' and 'indices' must hold {n} entries, like the kernel")
    for key in ("class_index", "width", "num_classes", "dataset_size"):
        obj[key] = None if obj[key] is None else int(obj[key])
    return obj


class KernelNetwork:
    """An infinite-width kernel file (calculate_kernel.py --arch) in the place of a checkpoint's
    network for visualize_ntk_features.py: dataset, model, width, num_classes and `tools`, which
    align images through the kernel."""

    def __init__(self, kfile, num_classes):
        a = kfile["architecture"]
        self.kernel_type, self.k_train = kfile.get("kernel_type", "ntk"), kfile["kernel"]
        self.dataset, self.model, self.width, self.num_classes = kfile["dataset"], kfile["model"], a["width"], num_classes
        self.kernel_fn = infinite.architecture(a["arch"], a["depth"], width=a["width"], W_std=a["W_std"],
                                               b_std=a["b_std"] or None, parameterization=a["parameterization"]).kernel_fn

    def tools(self, classes, loop, x_kernel):
        """(TangentTools through the kernel, their `params`: the kernel's images X)."""
        return (tangent_features.make_kernel_tools(self.kernel_fn, self.k_train, classes, loop, get=self.kernel_type),
                jnp.asarray(x_kernel))


def safe_label(label):
    """A run label as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def run_labels(args):
    """analyze_ntk.py dynamics: one distinct label per run, checked with the other flags."""
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


# --------------------------------------------------------------------------------------
# analyze_ntk.py's outputs: what they were made from, and the refusal to replace others'
# --------------------------------------------------------------------------------------
# Flags that do not change what an analysis computes.
ANALYSIS_NOT_INPUTS = ("out_dir", "no_progress", "memory_gb", "data_dir", "save_name")


def analysis_inputs(args, **resolved):
    """What an analysis' outputs are made from: its flags (input files by content), recorded in its JSON as
    'inputs' so that a rerun with the same inputs may replace the outputs and other inputs may not."""
    inputs = {k: v for k, v in vars(args).items() if k not in ANALYSIS_NOT_INPUTS}
    if getattr(args, "model_path", None) is not None:
        inputs["model_path"] = utils.file_record(args.model_path)
    if getattr(args, "transfer_to", None) is not None:
        inputs["transfer_to"] = [utils.file_record(p) for p in args.transfer_to]
    if getattr(args, "runs", None) is not None:
        inputs["runs"] = [utils.file_record(r) for r in args.runs]
    if getattr(args, "kernel_files", None) is not None:
        inputs["kernel_files"] = [[utils.file_record(f) for f in files] for files in args.kernel_files]
    inputs.update(resolved)
    return inputs


def write_summary(json_path, summary):
    """An analysis' JSON summary, written last: it records the inputs of the outputs written before it
    (utils.begin_outputs noted them, so an interrupted analysis may be rerun as it was)."""
    utils.atomic_json(json_path, summary)
    utils.end_outputs(json_path)


def check_analysis_outputs(files, json_path, inputs, what):
    """Refuse to replace `files` (or `json_path`, which records the inputs) made from other inputs."""
    utils.check_outputs([json_path] + list(files), inputs, what, "give another --out_dir, or delete those files")
