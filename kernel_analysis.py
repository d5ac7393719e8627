"""Kernel analyses of Tsilivis & Kempe (NeurIPS 2022), as pure functions of kernel matrices.

Three groups, all free of file I/O and of any particular network:

* **Kernel motion** across checkpoints: the kernel distance d(K1, K2), the polar dynamics of
  a sequence of kernels against the first one (also restricted to the top-k eigenspace and to
  the bottom-k one, or with bottom='rest' to all but the top k: Tsilivis & Kempe's top 20 and
  bottom 2480 of a 2500 x 2500 full NTK), the fraction of eigenvalue mass in the top k
  eigenvalues, and all of these for one run's checkpoints (`kernel_motion`, one eigendecomposition
  per kernel).
* **Kernel predictor and eigen-features**: f(x) = K(x,X) (K(X,X) + r I)^-1 Y and its
  decomposition f = sum_i f_i along the eigenvectors of K(X,X).
* **Training-free attacks** on the kernel predictor (FGSM, PGD), for any differentiable
  `kernel_fn(x) -> K(x, X)`.

Conventions
-----------
* `k_train_train` is K(X, X) [n, n]; `k_test_train` is K(x, X) [m, n].
* Eigenvalues are sorted in DESCENDING order everywhere (index 0 = largest).
* Targets Y are CENTERED one-hot vectors, Y = onehot(y) - 1/C. Centering subtracts the same
  number from every class score of the full predictor, so its predictions (argmax) equal those
  of the uncentered predictor; it removes the class-independent offset that the top (nearly
  constant) eigenvector would otherwise carry.
* The ridge `r` is absolute here; the scripts pass `ridge_rel * mean(diag K)`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import attacks

# --------------------------------------------------------------------------------------
# Kernel motion
# --------------------------------------------------------------------------------------


def kernel_similarity(k1, k2):
    """Cosine similarity <K1, K2>_F / (||K1||_F ||K2||_F) as a float (0 if either is zero)."""
    k1 = np.asarray(k1, np.float64)
    k2 = np.asarray(k2, np.float64)
    denom = np.linalg.norm(k1) * np.linalg.norm(k2)
    if denom == 0.0:
        return 0.0
    return float(np.clip(np.sum(k1 * k2) / denom, -1.0, 1.0))


def kernel_distance(k1, k2):
    """Kernel distance d(K1, K2) = 1 - <K1,K2>_F / (||K1||_F ||K2||_F), a float in [0, 2].

    Scale invariant: d(K, c K) = 0 for any c > 0 (Fort et al. 2020; Tsilivis & Kempe 2022)."""
    return 1.0 - kernel_similarity(k1, k2)


def distance_matrix(kernels):
    """[T, T] matrix of d(K_s, K_t) for a list of T kernels (symmetric, zero diagonal). The
    Frobenius inner products are taken pair by pair: no copy of the T kernels is made."""
    t = len(kernels)
    flat = [np.asarray(k, np.float64).ravel() for k in kernels]  # views of contiguous kernels
    gram = np.empty((t, t))
    for s_ in range(t):
        for u in range(s_, t):
            gram[s_, u] = gram[u, s_] = np.dot(flat[s_], flat[u])
    norms = np.sqrt(np.diag(gram))
    denom = np.outer(norms, norms)
    sim = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    d = 1.0 - np.clip(sim, -1.0, 1.0)
    d[np.arange(t), np.arange(t)] = 0.0
    return d


def eigh_desc(k, fix_signs=False):
    """Eigen-decomposition of the symmetric part of `k`, eigenvalues in descending order.

    Returns (evals [n], evecs [n, n]) with evecs[:, i] the i-th eigenvector. `fix_signs`: each
    eigenvector's sign is chosen so that its largest-magnitude entry is positive (eigh's sign is
    arbitrary), for outputs that show an eigenvector itself."""
    k = np.asarray(k, np.float64)
    k = 0.5 * (k + k.T)
    evals, evecs = np.linalg.eigh(k)
    evals, evecs = evals[::-1].copy(), evecs[:, ::-1].copy()
    if fix_signs:
        pivot = evecs[np.argmax(np.abs(evecs), axis=0), np.arange(evecs.shape[1])]
        evecs *= np.where(pivot < 0, -1.0, 1.0)[None, :]
    return evals, evecs


def eigen_solve(evals, evecs, targets, shift=0.0):
    """(coefs, w) with coefs = U^T Y / (lambda + shift) and w = U coefs = (K + shift I)^-1 Y, from
    K's eigen-decomposition; `targets` Y is [n] or [n, m] (coefs and w take its shape)."""
    y = np.asarray(targets, np.float64)
    denom = evals + shift
    coefs = (evecs.T @ y) / (denom if y.ndim == 1 else denom[:, None])
    return coefs, evecs @ coefs


# The bottom eigenspace of the motion analysis: 'k', the k smallest eigenvalues; 'rest', all but
# the k largest (Tsilivis & Kempe: top 20 and bottom 2480 of 2500).
BOTTOMS = ("k", "rest")


def _check_count(k_count, n, rest=False):
    if rest and not 1 <= k_count < n:
        raise ValueError(f"k must be in [1, {n - 1}] so that a rest remains (got {k_count})")
    if not 1 <= k_count <= n:
        raise ValueError(f"k must be in [1, {n}] (got {k_count})")


def _parts(k, evals, evecs, k_count, bottom):
    """(top, bottom) parts of K from its `eigh_desc` (evals, evecs): U_k diag(l_k) U_k^T on the k
    largest eigenvalues, and on the k smallest (bottom 'k') or the symmetric part of K minus the
    top part (bottom 'rest': K on all its other eigenvalues)."""
    n = len(evals)
    _check_count(k_count, n, bottom == "rest")
    u = evecs[:, 0:k_count]
    top = (u * evals[0:k_count]) @ u.T
    if bottom == "rest":
        k = np.asarray(k, np.float64)
        return top, 0.5 * (k + k.T) - top
    sel = slice(n - k_count, n)
    u = evecs[:, sel]
    return top, (u * evals[sel]) @ u.T


def eigenspace_part(k, k_count, which="top"):
    """The part of K on its own top-k (largest) or bottom-k (smallest) eigenvalues:
    U_k diag(lambda_k) U_k^T [n, n]. `which` is 'top', 'bottom', 'rest' (K on all but its k
    largest eigenvalues: K's symmetric part minus its top-k part) or 'full' (K itself)."""
    if which == "full":
        return np.asarray(k, np.float64)
    if which not in ("top", "bottom", "rest"):
        raise ValueError(f"which must be 'top', 'bottom', 'rest' or 'full' (got {which!r})")
    evals, evecs = eigh_desc(k)
    top, bottom = _parts(k, evals, evecs, k_count, "k" if which == "bottom" else "rest")
    if which == "top":
        return top
    return bottom


class _PolarTrack:
    """`polar_dynamics` of kernels fed one at a time (`add`), holding only K_0."""

    def __init__(self):
        self.k0, self.dist, self.angle = None, [], []

    def add(self, k):
        k = np.asarray(k, np.float64)
        if self.k0 is None:
            self.k0 = k
        self.dist.append(np.linalg.norm(k - self.k0))
        self.angle.append(np.arccos(kernel_similarity(k, self.k0)))

    def result(self):
        dist = np.array(self.dist)
        final = dist[-1]
        radius = dist / final if final > 0 else np.zeros_like(dist)
        angle = np.array(self.angle)
        angle[0] = 0.0  # arccos(1 - rounding) would otherwise be ~1e-8
        return {"radius": radius.tolist(), "angle": angle.tolist(), "final_distance": float(final)}


def polar_dynamics(kernels):
    """Polar coordinates of a sequence of kernels K_0..K_T relative to K_0.

    radius_t = ||K_t - K_0||_F / ||K_T - K_0||_F   (0 at t = 0, 1 at t = T; all zeros if K_T = K_0)
    angle_t  = arccos(<K_t, K_0>_F / (||K_t||_F ||K_0||_F))   (radians, 0 at t = 0)

    Returns a dict of float lists 'radius', 'angle' (length T+1) and 'final_distance'
    ||K_T - K_0||_F."""
    track = _PolarTrack()
    for k in kernels:
        track.add(k)
    return track.result()


def _eigen_motion(kernels, k_count, bottom="k"):
    """({'full', 'top', 'bottom'}: polar dynamics, [descending spectrum of each K_t]) with ONE
    eigendecomposition per kernel; the parts of K_t are made, used and dropped one kernel at a
    time (only K_0's are held)."""
    if bottom not in BOTTOMS:
        raise ValueError(f"bottom must be one of {', '.join(BOTTOMS)} (got {bottom!r})")
    tracks = {which: _PolarTrack() for which in ("full", "top", "bottom")}
    spectra = []
    for kernel in kernels:
        evals, evecs = eigh_desc(kernel)
        top, low = _parts(kernel, evals, evecs, k_count, bottom)
        del evecs
        tracks["full"].add(kernel)
        tracks["top"].add(top)
        tracks["bottom"].add(low)
        spectra.append(evals)
    return {which: track.result() for which, track in tracks.items()}, spectra


def eigenspace_polar_dynamics(kernels, k_count, bottom="k"):
    """`polar_dynamics` of the full kernels, of their top-k parts and of their bottom parts: the
    bottom-k eigenspace (bottom 'k') or all but the top k (bottom 'rest', Tsilivis & Kempe's).

    Each K_t is truncated on ITS OWN eigenvectors (so a rotation of the eigenspace counts as
    motion). Returns {'full': ..., 'top': ..., 'bottom': ...}."""
    return _eigen_motion(kernels, k_count, bottom)[0]


def eigenvalue_mass(evals, k_count):
    """Fraction of the squared eigenvalue mass in the k largest: sum_{i<k} lambda_i^2 / sum lambda_i^2.

    `evals` in any order; a float in [0, 1], non-decreasing in k (0 for the zero matrix)."""
    sq = np.sort(np.asarray(evals, np.float64) ** 2)[::-1]
    total = sq.sum()
    if total == 0.0:
        return 0.0
    return float(min(1.0, sq[:k_count].sum() / total))


# The m of the top-m eigenvalue masses in `kernel_motion`.
MASS_KS = (10, 20)
# The formulas of `kernel_motion`'s numbers, in words (recorded in analyze_ntk.py's dynamics.json).
MOTION_DEFINITIONS = {
    "distance": "d(K1,K2) = 1 - <K1,K2>_F / (|K1|_F |K2|_F)",
    "radius": "|K_t - K_0|_F / |K_T - K_0|_F",
    "angle": "arccos(<K_t,K_0>_F / (|K_t|_F |K_0|_F)) in radians",
    "top/bottom": "K_t restricted to its own k largest / smallest eigenvalues (U_k diag(l_k) U_k^T)",
    "mass_topm": "sum_{i<=m} l_i^2 / sum_i l_i^2",
    "velocity": "d(K_{t-1}, K_t) / (epoch_t - epoch_{t-1})"}
# The "top/bottom" definition with bottom 'rest'.
REST_DEFINITION = ("top: K_t restricted to its own k largest eigenvalues (U_k diag(l_k) U_k^T); bottom: K_t on all "
                   "its other n - k eigenvalues (K_t minus its top part; Tsilivis & Kempe's bottom space)")


def motion_definitions(bottom="k"):
    """MOTION_DEFINITIONS for `kernel_motion`'s `bottom` ('k' or 'rest')."""
    return {**MOTION_DEFINITIONS, **({"top/bottom": REST_DEFINITION} if bottom == "rest" else {})}


def kernel_motion(epochs, kernels, k_count, bottom="k"):
    """Every number of one run's kernels K_t at `epochs` (increasing), as JSON-ready lists:
    'distance_matrix' d(K_s, K_t), 'distance_to_init' d(K_0, K_t), 'velocity'
    d(K_{t-1}, K_t) / (epoch_t - epoch_{t-1}) (None at t = 0 and for repeated epochs), 'polar'
    (`eigenspace_polar_dynamics` with k = k_count and `bottom`: 'k', the bottom-k eigenspace, or
    'rest', all but the top k), 'eigenspaces' (size n, top_count, bottom, bottom_count), 'mass'
    (top-m eigenvalue mass for m in MASS_KS), 'frobenius_norm', 'trace' and 'eigenvalues_top'
    (the max(MASS_KS) largest). One eigendecomposition per kernel."""
    polar, spectra = _eigen_motion(kernels, k_count, bottom)
    n = len(spectra[0])
    dist = distance_matrix(kernels)
    velocity = [None] + [float(dist[t - 1, t] / (epochs[t] - epochs[t - 1])) if epochs[t] > epochs[t - 1] else None
                         for t in range(1, len(epochs))]
    return {
        "epochs": list(map(float, epochs)),
        "distance_matrix": dist.tolist(),
        "distance_to_init": dist[0].tolist(),
        "velocity": velocity,
        "polar": polar,
        "eigenspaces": {"size": n, "top_count": int(k_count), "bottom": bottom,
                        "bottom_count": int(n - k_count if bottom == "rest" else k_count)},
        "mass": {f"top{m}": [eigenvalue_mass(spectrum, m) for spectrum in spectra] for m in MASS_KS},
        "frobenius_norm": [float(np.linalg.norm(kernel)) for kernel in kernels],
        "trace": [float(np.trace(kernel)) for kernel in kernels],
        "eigenvalues_top": [spectrum[:max(MASS_KS)].tolist() for spectrum in spectra],
    }


def motion_report(label, motion):
    """One run's `kernel_motion` in words: final distance to K_0, the epoch at which the radius
    reaches half its final value, the top-10 mass at the start and end; and a note when K_0 is
    far larger than the later kernels (then the radius says little)."""
    e = motion["epochs"]
    half = next((ep for ep, rad in zip(e, motion["polar"]["full"]["radius"]) if rad >= 0.5), None)
    lines = [f"{label}: {len(e)} checkpoints (epochs {e[0]:g}..{e[-1]:g}); final d(K_0, K_T) = "
             f"{motion['distance_to_init'][-1]:.4f}; half of the final radius reached at epoch {half}; "
             f"top-10 mass {motion['mass']['top10'][0]:.3f} -> {motion['mass']['top10'][-1]:.3f}"]
    norms = motion["frobenius_norm"]
    if len(norms) > 1 and norms[0] > 100 * np.median(norms[1:]):
        lines.append(f"note ({label}): |K_0|_F is {norms[0] / np.median(norms[1:]):.3g} times the median of the later "
                     "kernels (with BatchNorm, the epoch-0 kernel uses initial running statistics), so |K_t - K_0| "
                     "is about |K_0| at every t and the radius stays near 1; the angle and the kernel distance are "
                     "scale-free and remain informative")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Kernel predictor and eigen-features
# --------------------------------------------------------------------------------------


def centered_one_hot(labels, num_classes):
    """Y = onehot(labels) - 1/C, [n, C] float64."""
    y = np.zeros((len(labels), num_classes))
    y[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return y - 1.0 / num_classes


class EigenPredictor(dict):
    """The kernel predictor in eigen-coordinates (a plain dict, picklable):
    'evals' [n] (descending), 'evecs' [n, n], 'coefs' [n, C] with
    coefs[i] = u_i^T Y / (lambda_i + ridge), 'alpha' [n, C] = (K + ridge I)^-1 Y, 'ridge'."""


def eigen_predictor(evals, evecs, y_targets, ridge):
    """The `EigenPredictor` of K = U diag(evals) U^T (evals descending, evecs U): alpha =
    (K + ridge I)^-1 Y through `eigen_solve`. Y is [n, C] (or [n]: coefs and alpha are [n]).
    Raises ValueError when K + ridge I is not positive definite."""
    shifted = evals + ridge
    if np.any(shifted <= 0):
        raise ValueError(f"K + ridge I is not positive definite (smallest eigenvalue {shifted.min():.3g}); "
                         "increase the ridge")
    coefs, alpha = eigen_solve(evals, evecs, y_targets, ridge)   # [n, C] each
    return EigenPredictor(evals=evals, evecs=evecs, coefs=coefs, alpha=alpha, ridge=float(ridge))


def fit_kernel_predictor(k_train_train, y_targets, ridge):
    """Fit f(x) = K(x,X) (K(X,X) + ridge I)^-1 Y through one eigen-decomposition of K(X,X).

    Returns an `EigenPredictor`. Using the same decomposition for alpha and for the
    eigen-features makes sum_i f_i = f hold to rounding error."""
    return eigen_predictor(*eigh_desc(k_train_train), y_targets, ridge)


def kernel_predict(k_test_train, predictor):
    """Predictor outputs f(x) = K(x,X) alpha, [m, C]."""
    return np.asarray(k_test_train, np.float64) @ predictor["alpha"]


def eigen_features(k_test_train, predictor, indices=None):
    """Eigen-features f_i(x) = (lambda_i + ridge)^-1 K(x,X) u_i u_i^T Y, [len(indices), m, C].

    Each f_i is rank one in the class axis: a scalar projection K(x,X) u_i times the class
    vector coefs[i]. Summed over ALL indices they give `kernel_predict` exactly."""
    idx = np.arange(len(predictor["evals"])) if indices is None else np.asarray(indices)
    proj = np.asarray(k_test_train, np.float64) @ predictor["evecs"][:, idx]   # [m, F]
    return proj.T[:, :, None] * predictor["coefs"][idx][:, None, :]


def feature_usefulness(features, labels, num_classes):
    """Per feature, (accuracy of argmax f_i(x), correlation with the centered labels).

    The correlation is E<f_i(x), Y(x)> / sqrt(E||f_i(x)||^2 E||Y(x)||^2), scale free, in [-1, 1].
    `features` [F, m, C]; returns two [F] arrays."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    acc = np.mean(np.argmax(features, -1) == labels[None], axis=1)
    y = centered_one_hot(labels, num_classes)
    num = np.mean(np.sum(features * y[None], -1), axis=1)
    den = np.sqrt(np.mean(np.sum(features ** 2, -1), axis=1) * np.mean(np.sum(y ** 2, -1)))
    corr = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return acc, corr


# --------------------------------------------------------------------------------------
# Training-free attacks on kernel predictors
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def make_kernel_logits(kernel):
    """`logits((variables, weights), x) -> kernel(variables, x) @ weights` [m, C] for a
    differentiable `kernel(variables, x) -> K(x, X)` [m, n] such as `ntk.cross_kernel`'s:
    the kernel's arrays travel as arguments, so the attack's jitted step is compiled once for
    every checkpoint of a network. weights [n, C] is alpha (full predictor) or u_i coefs_i^T
    (one eigen-feature). Pass (variables, weights) as `attack_kernel_predictor`'s weights.
    Memoized on `kernel`, so the same kernel gives the same logits function."""
    def logits(variables_and_weights, x):
        variables, weights = variables_and_weights
        return kernel(variables, x) @ weights
    return logits


def _xent_sum(logits_fn, weights, x, y):
    logp = jax.nn.log_softmax(logits_fn(weights, x))
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))


@functools.partial(jax.jit, static_argnames=("logits_fn",))
def fgsm(logits_fn, weights, x, y, eps):
    """Fast gradient sign method (Goodfellow et al., ICLR 2015) on the cross-entropy of
    `logits_fn(weights, x)`: x + eps sign(grad), clipped to [0, 1]. Returns x_adv, x's shape."""
    g = jax.grad(_xent_sum, argnums=2)(logits_fn, weights, x, y)
    return attacks.project(x + eps * jnp.sign(g), x, eps, "linf")


def attack_kernel_predictor(logits_fn, weights, x, y, *, method, eps, steps, key, batch_size=None,
                            step_size=None, random_start=True):
    """FGSM or L-inf PGD (attacks.pgd: Madry et al. 2018; by default a random start and step
    2 eps/steps) on the cross-entropy of a kernel predictor's outputs, in batches of `batch_size`.

    `weights` is what `logits_fn` takes first: an [n, C] array, or a pytree such as
    `make_kernel_logits`'s (variables, weights); float leaves become float32.
    Returns x_adv as a numpy array, x's shape, inside the eps-ball around x and [0, 1]."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    weights = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float32) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else jnp.asarray(a),
        weights)
    batch_size = len(x) if batch_size is None else batch_size
    out = []
    for b, start in enumerate(range(0, len(x), batch_size)):
        xb, yb = jnp.asarray(x[start:start + batch_size]), jnp.asarray(y[start:start + batch_size])
        if method == "fgsm":
            xa = fgsm(logits_fn, weights, xb, yb, eps)
        elif method == "pgd":
            xa = attacks.pgd(logits_fn, weights, xb, yb, jax.random.fold_in(key, b), eps,
                             2.0 * eps / steps if step_size is None else step_size, steps=steps, norm="linf",
                             random_start=random_start)
        else:
            raise ValueError(f"method must be 'fgsm' or 'pgd' (got {method!r})")
        out.append(np.asarray(xa))
    return np.concatenate(out) if out else x.copy()
