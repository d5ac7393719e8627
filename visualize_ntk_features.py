"""Draw the images whose tangent features line up with the NTK's eigenvectors.

For a kernel file written by calculate_kernel.py (K[i, j] = <grad_theta f_c(x_i), grad_theta f_c(x_j)>
over n training images X) and the checkpoint it was computed from:

1. eigendecompose K = sum_k lambda_k u_k u_k^T, eigenvalues in descending order;
2. for each of the top `--n_images` eigenvectors u, form the parameter-space direction
   v = sum_j u[j] grad_theta f_c(x_j) over the SAME images X (one vjp over the batch);
3. start from a mid-grey image (0.5) and take `--steps` signed steps
   x <- clip(x + step_size * sign(grad_x cos(grad_theta f_c(x), v)), 0, 1):
   ascent gives the "positive" image, descent the "negative" one. The image kept is the
   iterate with the best cosine (highest for ascent, lowest for descent); the reference kept
   the last, which on a ReLU network can be worse than earlier ones, because fixed-size signed
   steps overshoot kinks. Every iterate's cosine is saved (`*_cos_history`);
4. one more ascent whose v uses the kernel-regression weights w = K^{-1} y_c
   (y_c[j] = 1 if label_j == c else 0) instead of an eigenvector.

Each step costs one reverse-over-reverse pass: a vjp in theta gives the tangent feature
g = grad_theta f_c(x), from which <g, v> and ||g|| both follow, and its gradient in x is one
more backward pass. No per-pixel gradients or Jacobians are formed. v is formed once per
image. The loop runs as one jitted `lax.fori_loop`, or on CPU as a host loop over the jitted
step (see `attacks.loop_mode`: XLA:CPU is several times slower inside while loops here).

`--class_index -1` (the kernel is the mean over the C logits of the per-class kernels): the
tangent feature of x is then the stacked (grad f_1(x), ..., grad f_C(x)), whose inner products
give exactly that mean kernel (up to the factor 1/C, which cancels in a cosine). v is stacked the
same way, v_c = sum_j u[j] grad f_c(x_j), and the `w` image uses W = K^{-1} Y with Y the one-hot
label matrix [n, C], v_c = sum_j W[j, c] grad f_c(x_j) (one regression per output, all sharing
K). This costs C times the single-class work.

Outputs, under dirname(model_path)/bonus_dir/: `{save_name}_class_{c}_{n}.pkl` (or
`{save_name}_{n}.pkl` for class -1, as calculate_kernel.py names its files) holding
pos_images / neg_images [n_images, H, W, C], w_image [H, W, C] (NHWC, in [0, 1]), the final
cosines and the eigenvalues; and a PNG with the same stem showing the images and the
kernel's eigenvalue spectrum.

The reference script crashed (hard-coded image paths of another project, a model built
without a class count, swapped arguments for the negative and w images, undefined names);
this one uses the kernel's own images and the checkpoint's model.
"""
from __future__ import annotations

import functools
import io
import os
import time
from typing import Callable, NamedTuple

import numpy as np

import cli
import utils
from utils import UserError

KERNEL_KEYS = ("kernel", "labels", "indices", "dataset", "class_index", "model", "width",
               "num_classes", "use_linear_params", "dataset_size")
# K is treated as ill-conditioned (and gets the ridge) above this condition number: the
# kernel comes from float32 gradients, so smaller eigenvalues than ~1e-8 lambda_max are noise.
MAX_CONDITION = 1e8
_CHUNK = 32  # images per vjp when forming v (bounds the memory of the backward pass)


EXAMPLES = [
    "python visualize_ntk_features.py --model_path runs/phase1_AC/parameters_final.pkl "
    "--kernel_path runs/phase1_AC/saved_kernel_class_0_100.pkl --n_images 4",
    "python visualize_ntk_features.py --model_path runs/phase1_AC/parameters_final.pkl "
    "--kernel_path runs/phase1_AC/saved_kernel_class_0_100.pkl --steps 100 --step_size 0.01",
]


def build_parser():
    p = cli.parser("Images whose NTK tangent features align with the kernel's top eigenvectors "
                   "(positive: ascent, negative: descent) and with the kernel-regression weights "
                   "K^-1 y_c. Writes a pickle and a PNG under dirname(model_path)/bonus_dir.", EXAMPLES)
    p.add_argument("--model_path", required=True, help="checkpoint the kernel was computed from")
    p.add_argument("--kernel_path", required=True,
                   help="kernel file written by calculate_kernel.py (its images, class and model are used)")
    p.add_argument("--dataset_size", type=int, default=None,
                   help="number of images in the kernel; must match the kernel file (default: the file's)")
    p.add_argument("--save_name", default="ntk_eig_images", help="stem of the output files")
    cli.add_class_index(p, default=None, help_extra="; must match the kernel file (default: the file's)")
    p.add_argument("--n_images", type=int, default=3, help="number of top eigenvectors to draw")
    p.add_argument("--steps", type=int, default=600, help="signed-gradient steps per image")
    p.add_argument("--step_size", type=float, default=0.001, help="size of each signed step (pixels in [0,1])")
    p.add_argument("--ridge", type=float, default=1e-4,
                   help="for w = K^-1 y_c only: when K is singular or ill-conditioned (condition number "
                        f"> {MAX_CONDITION:g}) solve (K + ridge * mean(diag K) * I) w = y_c instead; "
                        "the ridge used is printed and saved. 0 = refuse ill-conditioned kernels")
    p.add_argument("--loop", default="auto", choices=("auto", "fori", "host"),
                   help="how the steps run: 'fori' = one jitted lax.fori_loop; 'host' = the jitted step "
                        "dispatched from Python (XLA:CPU runs weight-gradient convolutions several times "
                        "slower inside a loop, jax-ml/jax#12868); auto = host on CPU, fori elsewhere")
    p.add_argument("--bonus_dir", default=".", help="sub-directory of dirname(model_path) for the outputs")
    cli.add_network_args(p)
    p.add_argument("--random_seed", type=cli.seed, default=None,
                   help="seed the kernel's images were drawn with; checked against the kernel file "
                        "(the images themselves come from the file's indices)")
    cli.add_no_progress(p)
    return p


# --------------------------------------------------------------------------------------
# Linear algebra on the host (float64)
# --------------------------------------------------------------------------------------
def kernel_weights(evals, evecs, targets, ridge):
    """Kernel-regression weights w = K^{-1} targets from K's eigendecomposition.

    `targets` is [n] or [n, m]. A ridge r = ridge * mean(eigenvalues) (= ridge * mean(diag K))
    is added only when K is singular or its condition number exceeds MAX_CONDITION.
    Returns (w with the shape of targets, r or None when no ridge was needed). Raises
    UserError when K needs a ridge and `ridge` is 0.
    """
    lam_max, lam_min = float(evals[0]), float(evals[-1])
    if lam_max <= 0:
        raise UserError("the kernel has no positive eigenvalue: it is zero or corrupt")
    shift = None
    if lam_min <= lam_max / MAX_CONDITION:
        if ridge <= 0:
            raise UserError(f"the kernel is singular or ill-conditioned (eigenvalues {lam_max:.3g} .. "
                            f"{lam_min:.3g}); pass --ridge > 0 to solve for w")
        shift = float(ridge * np.mean(evals))
    denom = evals + (shift or 0.0)
    if np.any(denom <= 0):
        raise UserError(f"the kernel has eigenvalues down to {lam_min:.3g}, too negative for "
                        f"--ridge {ridge:g}; pass a larger --ridge")
    import kernel_analysis
    return kernel_analysis.eigen_solve(evals, evecs, targets, shift or 0.0)[1], shift


# --------------------------------------------------------------------------------------
# Tangent features in JAX
# --------------------------------------------------------------------------------------
def _tree_vdot(a, b):
    import jax
    import jax.numpy as jnp
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _stacked_pullback(pullback, cotangent, k):
    """Apply a vjp `pullback` of an output [..., k] once per column: returns a tree with a leading
    axis k whose entry c is the pullback of the cotangent masked to column c."""
    import jax
    import jax.numpy as jnp
    if k == 1:
        return jax.tree_util.tree_map(lambda a: a[None], pullback(cotangent)[0])
    masks = jnp.eye(k, dtype=cotangent.dtype)
    return jax.vmap(lambda m: pullback(cotangent * m)[0])(masks)


class TangentTools(NamedTuple):
    direction: Callable   # (params, x [n,H,W,C], coef [n,k]) -> v, a params tree with leading axis k
    cosine: Callable      # (params, v, x [H,W,C]) -> cos(grad_theta f(x), v)
    ascend: Callable      # (params, v, x0, sign, step_size, steps) -> (x_best, cos_best, history)
    classes: tuple        # the logits whose tangent features are stacked
    loop: str             # 'fori' or 'host' (attacks.loop_mode)


def _make_direction(f, cls):
    """direction(params, x [n,H,W,C], coef [n,k]) -> v, v[k] = sum_j coef[j, k] grad_theta
    f_{cls[k]}(x_j): one vjp per chunk of at most _CHUNK images (one compiled shape)."""
    import jax
    import jax.numpy as jnp
    k = len(cls)

    @jax.jit
    def _chunk_direction(params, x, coef):
        _, pullback = jax.vjp(lambda p: f(p, x)[:, cls], params)  # output [b, k]
        return _stacked_pullback(pullback, coef.astype(jnp.float32), k)

    def direction(params, x, coef):
        x = np.asarray(x, np.float32)
        coef = np.asarray(coef, np.float32).reshape(len(x), k)
        total = None
        chunk = -(-len(x) // -(-len(x) // _CHUNK))  # equal chunks of at most _CHUNK images
        for start in range(0, len(x), chunk):
            xb, cb = x[start:start + chunk], coef[start:start + chunk]
            pad = chunk - len(xb)  # one compiled shape for all chunks
            if pad:
                xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
                cb = np.concatenate([cb, np.zeros((pad, k), cb.dtype)])  # padded images weigh 0
            part = _chunk_direction(params, xb, cb)
            total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
        return total
    return direction


def make_tangent_fns(f, classes, loop="auto"):
    """Tangent-feature tools for the logits `f(params, x) -> [N, C]` and the classes `classes`
    (a tuple: `(c,)` for one class, all classes for the mean kernel).

    Returns TangentTools with
    - `direction(params, x, coef) -> v`: v[k] = sum_j coef[j, k] grad_theta f_{classes[k]}(x_j),
      a params-shaped tree with a leading axis len(classes); x [n, H, W, C], coef [n, k].
      One vjp per chunk of images (per class when k > 1).
    - `cosine(params, v, x) -> scalar`: cos(grad_theta f(x), v) for one image x [H, W, C].
    - `ascend(params, v, x0, sign, step_size, steps) -> (x_best, cos_best, history)`: the
      signed-gradient loop x <- clip(x + sign * step_size * sign(grad_x cos), 0, 1) (sign +1
      ascends, -1 descends). history [steps + 1] is the cosine of every iterate (history[0] at
      x0); x_best [H, W, C] in [0, 1] is the iterate with the largest sign * cosine, cos_best its
      cosine. On smooth landscapes that is the last iterate; on ReLU networks a fixed-size signed
      step can overshoot a kink, and keeping the best iterate costs nothing.
      `loop` (see `attacks.loop_mode`): 'fori' runs the whole loop as one jitted lax.fori_loop;
      'host' dispatches the jitted step from Python, keeping every value on the device.
    """
    import jax
    import jax.numpy as jnp

    import attacks
    classes = tuple(int(c) for c in classes)
    k = len(classes)
    cls = np.asarray(classes)
    loop = attacks.loop_mode(loop)
    direction = _make_direction(f, cls)

    def cosine(params, v, x):
        # One vjp in theta gives the tangent feature g; <g, v> and ||g|| both come from it.
        _, pullback = jax.vjp(lambda p: f(p, x[None])[0, cls], params)  # output [k]
        g = _stacked_pullback(pullback, jnp.ones((k,), jnp.float32), k)
        v_norm = jnp.sqrt(_tree_vdot(v, v))
        g_norm = jnp.sqrt(_tree_vdot(g, g) + 1e-30)
        return _tree_vdot(g, v) / (g_norm * v_norm + 1e-30)

    def step(params, v, carry, sign, step_size, update):
        """Score the iterate x, keep it if it is the best so far, then (if `update`) move it."""
        x, x_best, c_best = carry
        c, grad_x = jax.value_and_grad(lambda x: cosine(params, v, x))(x)
        better = sign * c > sign * c_best
        x_best, c_best = jnp.where(better, x, x_best), jnp.where(better, c, c_best)
        x_next = jnp.clip(x + sign * step_size * jnp.sign(grad_x), 0.0, 1.0)
        return (jnp.where(update, x_next, x), x_best, c_best), c

    @functools.partial(jax.jit, static_argnames=("steps",))
    def ascend_fori(params, v, x0, sign, step_size, steps):
        # steps + 1 evaluations: the last only scores the final iterate (no update), so the
        # cosine is traced once and every iterate x_0 .. x_steps is scored.
        def body(i, state):
            carry, history = state
            carry, c = step(params, v, carry, sign, step_size, i < steps)
            return carry, history.at[i].set(c)

        init = ((x0, x0, -sign * jnp.inf), jnp.zeros((steps + 1,), jnp.float32))
        (_, x_best, c_best), history = jax.lax.fori_loop(0, steps + 1, body, init)
        return x_best, c_best, history

    step_jit = jax.jit(step)

    def ascend_host(params, v, x0, sign, step_size, steps):
        sign, step_size = jnp.float32(sign), jnp.float32(step_size)
        carry, history = (x0, x0, -sign * jnp.inf), []
        for i in range(steps + 1):  # asynchronous dispatch: no host sync inside the loop
            carry, c = step_jit(params, v, carry, sign, step_size, jnp.bool_(i < steps))
            history.append(c)
        return carry[1], carry[2], jnp.stack(history)

    return TangentTools(direction, jax.jit(cosine), ascend_fori if loop == "fori" else ascend_host, classes, loop)


# --------------------------------------------------------------------------------------
# Inputs
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


def _resolve(what, *sources):
    """The one value that all non-None `sources` ((label, value) pairs) agree on, else UserError."""
    given = [(label, value) for label, value in sources if value is not None]
    for label, value in given[1:]:
        if value != given[0][1]:
            raise UserError(f"{what} mismatch: {given[0][0]} says {given[0][1]!r} but {label} says {value!r}")
    return given[0][1] if given else None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def output_stem(args, class_index, n):
    return os.path.join(cli.output_dir(args.model_path, args.bonus_dir), args.save_name + cli.class_suffix(class_index, n))


def check_outputs(stem, inputs):
    """The images of another kernel (or other --steps, ...) under the same name are not replaced."""
    existing = utils.existing_files([stem + ".pkl", stem + ".png"])
    recorded = None
    if existing:
        try:
            obj = utils.restricted_load(stem + ".pkl")
            recorded = obj.get("inputs") if isinstance(obj, dict) else None
        except UserError:
            pass
    utils.check_replace(existing, recorded, inputs, "eigen-images",
                        "give another --save_name or --bonus_dir, or delete those files")


# --------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------
def _show(ax, image, title):
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def make_figure(result, title):
    """PNG bytes: row 1 positive images, row 2 negative images (one column per eigenvector,
    titled with eigenvalue and final cosine), the w image on the right, and the eigenvalue
    spectrum on a log scale below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    m = len(result["pos_images"])
    fig = plt.figure(figsize=(2.3 * (m + 1) + 0.6, 7.8), constrained_layout=True)
    grid = fig.add_gridspec(3, m + 1, height_ratios=[1, 1, 1.25])
    for i in range(m):
        lam = result["eigenvalues"][i]
        _show(fig.add_subplot(grid[0, i]), result["pos_images"][i],
              f"u{i + 1}+  λ={lam:.3g}\ncos={result['pos_cos'][i]:.3f}")
        _show(fig.add_subplot(grid[1, i]), result["neg_images"][i],
              f"u{i + 1}−  (descent)\ncos={result['neg_cos'][i]:.3f}")
    ridge = result["ridge"]
    target = "Y (one-hot)" if result["class_index"] == -1 else f"y (class {result['class_index']})"
    _show(fig.add_subplot(grid[0:2, m]), result["w_image"],
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


# --------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------
def open_inputs(args):
    """Check the kernel file, the checkpoint and the flags against each other, before any work.
    Returns (kernel file dict, Network, class_index, the kernel's images [n, H, W, C])."""
    import checkpoints
    import data
    kfile = load_kernel_file(args.kernel_path)
    n = len(kfile["kernel"])
    class_index = _resolve("class_index", ("the kernel file", kfile["class_index"]),
                           ("--class_index", args.class_index))
    _resolve("dataset_size", ("the kernel file's dataset_size", kfile["dataset_size"]),
             ("the kernel matrix", n), ("--dataset_size", args.dataset_size))
    _resolve("random_seed", ("the kernel file", kfile.get("random_seed")), ("--random_seed", args.random_seed))
    if args.n_images < 1 or args.n_images > n:
        raise UserError(f"--n_images {args.n_images} must be between 1 and the kernel's n={n}")
    if args.steps < 0 or not 0 < args.step_size < float("inf") or not 0 <= args.ridge < float("inf"):
        raise UserError("--steps must be >= 0, --step_size > 0 and --ridge >= 0 (both finite)")

    checkpoints.check_file(args.model_path)
    ckpt = checkpoints.load_checkpoint(args.model_path)
    meta = ckpt["meta"]
    kernel_ckpt = kfile.get("model_path")
    if kernel_ckpt and os.path.exists(kernel_ckpt) and not _same_file(kernel_ckpt, args.model_path):
        raise UserError(f"the kernel was computed from {kernel_ckpt}, not from --model_path {args.model_path}")
    agreed = {key: _resolve(key, ("the kernel file", kfile[key]), ("the checkpoint", meta.get(key)),
                            (f"--{key}", getattr(args, key))) for key in ("dataset", "model", "width")}
    if agreed["dataset"] is None or agreed["model"] is None:
        raise UserError("say --dataset and --model: neither the kernel file nor the checkpoint names them")
    num_classes = _resolve("num_classes", ("the kernel file", kfile["num_classes"]),
                           ("the checkpoint", meta.get("num_classes")),
                           (f"dataset {agreed['dataset']}", data.num_classes_of(agreed["dataset"])))
    if not -1 <= class_index < num_classes:
        raise UserError(f"class_index {class_index} is not -1 or a class of {agreed['dataset']} (0..{num_classes - 1})")
    dataset = data.load_dataset(agreed["dataset"], args.data_dir)
    _resolve("input_shape", ("the checkpoint", None if meta.get("input_shape") is None else tuple(meta["input_shape"])),
             (f"dataset {agreed['dataset']}", dataset.input_shape))
    idx = kfile["indices"]
    if idx.min() < 0 or idx.max() >= len(dataset.x_train):
        raise UserError(f"the kernel's indices reach {idx.max()}, beyond the {len(dataset.x_train)} "
                        f"training images of {agreed['dataset']} in {args.data_dir}")
    if not np.array_equal(dataset.y_train[idx], kfile["labels"]):
        raise UserError(f"the kernel's labels differ from those of its indices in {agreed['dataset']}'s training "
                        f"split under {args.data_dir}: not the images the kernel was computed on")
    net = checkpoints.Network(ckpt, args.model_path, **agreed)
    return kfile, net, class_index, dataset.x_train[idx]


def draw_images(args, tools, params, x_kernel, evecs, w):
    """The ascent/descent images of the top --n_images eigenvectors and the w image.
    Returns ({'pos_images', 'neg_images', 'pos_cos', 'neg_cos', 'pos_cos_history',
    'neg_cos_history', 'w_image', 'w_cos', 'w_cos_history'}, seconds)."""
    import jax.numpy as jnp
    from tqdm import tqdm
    m, k, n = args.n_images, len(tools.classes), len(x_kernel)
    image_shape = x_kernel.shape[1:]
    x0 = jnp.full(image_shape, 0.5, jnp.float32)
    out = {f"{kind}_{what}": np.zeros(shape, np.float64 if what == "cos" else np.float32) for kind in ("pos", "neg")
           for what, shape in (("images", (m,) + image_shape), ("cos", (m,)), ("cos_history", (m, args.steps + 1)))}
    jobs = [("pos", i) for i in range(m)] + [("neg", i) for i in range(m)] + [("w", 0)]
    directions = {}
    t0 = time.perf_counter()
    for kind, i in tqdm(jobs, desc="eigen-images", disable=args.no_progress or None):
        if kind == "w":
            v = tools.direction(params, x_kernel, w.reshape(n, k))
        else:
            if i not in directions:
                directions[i] = tools.direction(params, x_kernel, np.repeat(evecs[:, i:i + 1], k, axis=1))
            v = directions.pop(i) if kind == "neg" else directions[i]
        x, c_best, history = tools.ascend(params, v, x0, -1.0 if kind == "neg" else 1.0, args.step_size,
                                          steps=args.steps)
        if kind == "w":
            out.update(w_image=np.asarray(x), w_cos=float(c_best), w_cos_history=np.asarray(history))
        else:
            out[f"{kind}_images"][i], out[f"{kind}_cos"][i] = np.asarray(x), float(c_best)
            out[f"{kind}_cos_history"][i] = np.asarray(history)
    return out, time.perf_counter() - t0


def run(args):
    """Check inputs, draw the eigen-images, write the pickle and PNG. Returns the result dict
    (also saved) with 'pkl_path' and 'png_path' added."""
    kfile, net, class_index, x_kernel = open_inputs(args)
    n = len(x_kernel)
    stem = output_stem(args, class_index, n)
    inputs = {"kernel_path": os.path.abspath(args.kernel_path), "model_path": os.path.abspath(args.model_path),
              "n_images": args.n_images, "steps": args.steps, "step_size": args.step_size, "ridge": args.ridge}
    check_outputs(stem, inputs)
    utils.check_writable_dir(os.path.dirname(stem), "--bonus_dir")
    use_lin = bool(kfile["use_linear_params"])
    f, params = net.kernel_fn(use_lin)

    # ---- spectrum and regression weights (host, float64) ----
    import kernel_analysis
    evals, evecs = kernel_analysis.eigh_desc(kfile["kernel"], fix_signs=True)
    classes = tuple(range(net.num_classes)) if class_index == -1 else (class_index,)
    targets = (kfile["labels"][:, None] == np.asarray(classes)[None, :]).astype(np.float64)  # [n, k]
    w, ridge_used = kernel_weights(evals, evecs, targets, args.ridge)
    if ridge_used is not None:
        print(f"K is ill-conditioned (eigenvalues {evals[0]:.3g} .. {evals[-1]:.3g}): solving for w "
              f"with ridge {ridge_used:.3g} (= {args.ridge:g} * mean diag K)")

    tools = make_tangent_fns(f, classes, loop=args.loop)
    images, seconds = draw_images(args, tools, params, x_kernel, evecs, w)
    m, k = args.n_images, len(classes)
    result = {**images, "eigenvalues": evals, "eigenvectors": evecs[:, :m], "w": w.reshape(n, k) if k > 1 else w[:, 0],
              "ridge": ridge_used, "class_index": class_index, "classes": list(classes),
              "steps": args.steps, "step_size": args.step_size, "loop": tools.loop, "use_linear_params": use_lin,
              "dataset": net.dataset, "model": net.model, "width": net.width, "num_classes": net.num_classes,
              "kernel_path": os.path.abspath(args.kernel_path), "model_path": os.path.abspath(args.model_path),
              "indices": kfile["indices"], "labels": kfile["labels"], "seconds": seconds,
              "config": utils.run_config(args), "inputs": inputs}
    pkl_path, png_path = stem + ".pkl", stem + ".png"
    utils.atomic_pickle(pkl_path, result)
    which = "mean over logits" if class_index == -1 else f"class {class_index}"
    title = (f"NTK eigen-images: {net.model}" + (f" (width {net.width})" if net.model == "resnet18" else "")
             + f", {net.dataset}, {which}, n={n}, {args.steps} steps of {args.step_size:g}"
             + (", lin_params" if use_lin else ""))
    utils.atomic_write_bytes(png_path, make_figure(result, title))

    for i in range(m):
        print(f"u{i + 1}: eigenvalue {evals[i]:.4g}  cos+ {images['pos_cos'][i]:+.3f}  "
              f"cos- {images['neg_cos'][i]:+.3f}  (mid-grey start {images['pos_cos_history'][i, 0]:+.3f})")
    print(f"w: cos {images['w_cos']:+.3f} (mid-grey start {images['w_cos_history'][0]:+.3f}); "
          f"{2 * m + 1} images in {seconds:.1f} s")
    print(f"wrote {pkl_path}")
    print(f"wrote {png_path}")
    result["pkl_path"], result["png_path"] = pkl_path, png_path
    return result


def main(argv=None):
    utils.run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
