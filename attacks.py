"""Adversarial attacks by name, and evaluation under attack: the attacks' configuration, the
geometry, losses and loops they share, PGD, running an attack or ensemble on batches, accuracy
over a dataset, and the evaluation of a checkpoint that eval_and_make_adv.py runs (its
--test_path reader, notes and summary fields). The AutoAttack members (APGD, FAB-T, Square) are
in autoattack.py, which imports this module; the runner here (`_run_member`) imports it back
when it runs, so neither import is circular.

Every attack takes a `predict(variables, x) -> logits` function, built once per dynamics
(see `make_predict`), so the same code attacks standard, linearized and centered models.
BatchNorm always runs in inference mode here, and the state returned by the network is
discarded, so an attack can never move the running statistics.

Attacks (`AttackConfig.name`, `--attack`):
- `pgd`:      PGD on the cross-entropy (Madry et al., ICLR 2018), fixed step, one random start
              per restart. This is the reference's evaluation, and its counting: an example is
              robust if the attack's last iterate is classified correctly.
- `apgd-ce`:  Auto-PGD on the cross-entropy (`autoattack.apgd`).
- `apgd-dlr`: Auto-PGD on the *targeted* DLR loss (the paper's APGD-T), run once per target:
              the top-`n_targets` other classes of the clean logits, in order.
- `fab-t`:    targeted FAB (`autoattack.fab_t`), a minimum-norm attack; run once per target like
              apgd-dlr. It succeeds where the smallest adversarial point it finds lies within eps.
- `square`:   the Square Attack (`autoattack.square`), a random search that only reads the
              logits (the margin), so a masked or useless gradient does not stop it.
- `ensemble`: AutoAttack's standard version: apgd-ce, apgd-dlr, fab-t, square, each run only on
              the examples still robust after the attacks before it (clean mistakes are never
              attacked). The defaults are AutoAttack's: 100 iterations, 9 targets, 5000 queries.
- `ensemble-fast`: pgd, apgd-ce, then apgd-dlr, each on every example (the three-attack
              ensemble of earlier versions).
An example is robust to an ensemble only if it survives every member. Every attack but pgd
follows AutoAttack's counting: an example misclassified when clean is not robust (the clean image
is itself a point of the eps-ball).

With `restarts > 1` every attack runs again from fresh random starts, and an example counts as
robust only if it survives every restart (and, for apgd-dlr and fab-t, every target).

Each attack step is one jitted function. On accelerators the steps run inside jit in a
`lax.fori_loop`; on CPU the host dispatches the jitted step once per iteration instead, because
XLA:CPU runs the convolutions' backward pass 2-3 times slower inside a while loop
(jax-ml/jax#12868; `bench/bench_attacks.py --loops fori,host` measures both). The per-step dispatch
costs microseconds against a step of milliseconds to seconds, and both give the same iterates.
`NTK_ATTACK_LOOP=fori|host` overrides the choice. Inside an outer `jax.jit` the loop is always
a `fori_loop`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import parallel
from cli import ATTACKS, L2_EPS, L2_STEP_SIZE, NORMS
from models import dynamics_apply
from utils import UserError, check_file, decode_keys, restricted_load

SINGLE_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "fab-t", "square")
ENSEMBLES = {
    "ensemble": ("apgd-ce", "apgd-dlr", "fab-t", "square"),   # AutoAttack's standard order
    "ensemble-fast": ("pgd", "apgd-ce", "apgd-dlr"),
}
assert ATTACKS == SINGLE_ATTACKS + tuple(ENSEMBLES)  # the names the flags offer (cli.ATTACKS)
SURVIVOR_ENSEMBLES = ("ensemble",)   # members attack only the examples still robust
GRADIENT_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "fab-t")
# FAB-T's constants (autoattack.py), here because AttackConfig.describe() reports them
FAB_ALPHA_MAX = 0.1    # FAB's largest weight of the step from the original image
FAB_ETA = 1.05         # FAB's overshoot past the linearised boundary
FAB_BETA = 0.9         # FAB's backward step towards the original image after a success
ZERO_GRAD_WARN_FRACTION = 0.01  # warn about gradient masking above this fraction of inputs
# Warn about gradient masking when Square, run after the gradient attacks, fools more than
# max(SQUARE_WARN_MIN, SQUARE_WARN_FRACTION * n) examples (AutoAttack warns above 0.2%).
SQUARE_WARN_MIN = 2
SQUARE_WARN_FRACTION = 0.002


def make_predict(apply, dynamics):
    """`predict(variables, x) -> logits [N, C]` for variables = (theta, theta0, net_state),
    with BatchNorm in inference mode."""
    def predict(variables, x):
        theta, theta0, net_state = variables
        return dynamics_apply(apply, dynamics, theta, theta0, net_state, x, is_training=False)[0]
    return predict


def make_components(apply, dynamics):
    """`components(variables, x) -> {'f': [N, C], 'df': [N, C]}` of `models.dynamics_apply`
    (for linearized models f = f(theta0; x), df = J(theta0; x)(theta - theta0)), BN in
    inference mode. Pass it to `evaluate(..., components=...)`."""
    def components(variables, x):
        theta, theta0, net_state = variables
        return dynamics_apply(apply, dynamics, theta, theta0, net_state, x, is_training=False,
                              return_components=True)[2]
    return components


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttackConfig:
    """One evaluation attack.

    norm: 'linf' or 'l2'; eps: radius in pixel units ([0, 1] images); step_size: PGD's fixed
    step (APGD starts at 2*eps and adapts); steps: iterations per run of pgd and apgd; name: one
    of ATTACKS; restarts: random restarts per attack (and per target for apgd-dlr and fab-t);
    n_targets: target classes of apgd-dlr and fab-t (capped at num_classes - 1); fab_steps:
    iterations per run of fab-t; square_queries: queries per run of square (the initial
    query not counted); square_p_init: Square's initial fraction of pixels per square.
    """
    norm: str = "linf"        # 'linf' or 'l2'
    eps: float = 4 / 255
    step_size: float = 2 * 4 / 255 / 100
    steps: int = 100
    name: str = "pgd"
    restarts: int = 1
    n_targets: int = 9
    fab_steps: int = 100
    square_queries: int = 5000
    square_p_init: float = 0.8

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; choose one of {', '.join(ATTACKS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if min(self.steps, self.restarts, self.n_targets, self.fab_steps, self.square_queries) < 1:
            raise ValueError("steps, restarts, n_targets, fab_steps and square_queries must be >= 1")
        if not 0 < self.square_p_init <= 1:
            raise ValueError(f"square_p_init must lie in (0, 1], got {self.square_p_init}")

    def members(self):
        """The single attacks this config runs, in order (one, or an ensemble's members)."""
        names = ENSEMBLES.get(self.name, (self.name,))
        return tuple(dataclasses.replace(self, name=n) for n in names)

    @property
    def on_survivors(self):
        """Each member attacks only the examples still robust (AutoAttack's standard version)."""
        return self.name in SURVIVOR_ENSEMBLES

    def describe(self):
        """What runs, as a JSON-able dict (step_size is PGD's; the other settings appear when a
        member uses them)."""
        names = [m.name for m in self.members()]
        d = {"attack": self.name, "norm": self.norm, "eps": self.eps, "step_size": self.step_size,
             "steps": self.steps, "restarts": self.restarts}
        if any(n.startswith("apgd") for n in names):
            d["apgd_initial_step"] = 2 * self.eps
        if "apgd-dlr" in names or "fab-t" in names:
            d["n_targets"] = self.n_targets
        if "fab-t" in names:
            d.update(fab_steps=self.fab_steps, fab_alpha_max=FAB_ALPHA_MAX, fab_eta=FAB_ETA, fab_beta=FAB_BETA)
        if "square" in names:
            d.update(square_queries=self.square_queries, square_p_init=self.square_p_init)
        if self.name in ENSEMBLES:
            d["members"] = names
            d["members_attack"] = "examples still robust" if self.on_survivors else "every example"
        return d


def linf_config(eps, steps, **kw):
    """The reference's L-inf PGD: step 2*eps/steps."""
    return AttackConfig(norm="linf", eps=eps, step_size=2 * eps / steps, steps=steps, **kw)


def l2_config(steps, eps=L2_EPS, step_size=L2_STEP_SIZE, **kw):
    """The reference's L2 PGD: eps 0.25, step 0.01."""
    return AttackConfig(norm="l2", eps=eps, step_size=step_size, steps=steps, **kw)


def attack_from_args(args, norm, eps, steps, step_size=None):
    """An AttackConfig from the options of `add_attack_args` (missing options take their
    defaults). eps and step_size in pixel units; step_size None means the reference's:
    2*eps/steps for L-inf, 0.01 for L2."""
    if step_size is None:
        step_size = 2 * eps / steps if norm == "linf" else L2_STEP_SIZE
    return AttackConfig(norm=norm, eps=float(eps), step_size=float(step_size), steps=int(steps),
                        name=getattr(args, "attack", "pgd") or "pgd",
                        restarts=int(getattr(args, "restarts", 1) or 1),
                        n_targets=int(getattr(args, "n_target_classes", 9) or 9),
                        fab_steps=int(getattr(args, "fab_steps", 100) or 100),
                        square_queries=int(getattr(args, "square_queries", 5000) or 5000),
                        square_p_init=float(getattr(args, "square_p_init", 0.8) or 0.8))


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) + 1e-12).reshape((-1,) + (1,) * (v.ndim - 1))


def _bcast(mask, x):
    """A per-example [N] array shaped to broadcast against x [N, ...]."""
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _where(mask, a, b):
    """Per example: a where mask [N], else b."""
    return jnp.where(_bcast(mask, a), a, b)


def _target_class(logits, y, rank):
    """[N] the class of rank `rank` (0 = highest) among the classes other than y in logits [N, C]."""
    other = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.argsort(-other, axis=1)[:, rank]


def project(x_adv, x0, eps, norm):
    """Clip to [0, 1], then project x_adv - x0 back onto the eps-ball. Because x0 is in
    [0, 1] the projection (a shrink towards x0) keeps the point in [0, 1]; the last clip
    only removes float rounding of x0 + delta."""
    x_adv = jnp.clip(x_adv, 0.0, 1.0)
    delta = x_adv - x0
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / _per_example_norm(delta))
    return jnp.clip(x0 + delta, 0.0, 1.0)


def random_start(key, x0, eps, norm):
    """One random start: uniform(-eps, eps) for L-inf; for L2 a Gaussian direction scaled to a
    uniform radius in [0, eps]. Followed by the clip and projection."""
    if norm == "linf":
        delta = jax.random.uniform(key, x0.shape, x0.dtype, -eps, eps)
    else:
        k1, k2 = jax.random.split(key)
        g = jax.random.normal(k1, x0.shape, x0.dtype)
        r = jax.random.uniform(k2, (x0.shape[0],) + (1,) * (x0.ndim - 1), x0.dtype)
        delta = g / _per_example_norm(g) * r * eps
    return project(x0 + delta, x0, eps, norm)


def _ascent_direction(g, norm):
    """Steepest-ascent direction of unit norm: sign(g) for L-inf, g/||g||_2 for L2."""
    return jnp.sign(g) if norm == "linf" else g / _per_example_norm(g)


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def _xent_sum(predict, variables, x, y):
    logits = predict(variables, x)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))


def cross_entropy_per_example(logits, y):
    """[N] cross-entropy of logits [N, C] at labels y [N]."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def dlr_targeted_per_example(logits, y, target):
    """[N] targeted DLR loss of Croce & Hein (2020), to be maximized:
        -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2),
    with z_pi the logits sorted in decreasing order. The denominator makes the loss invariant
    to shifting and scaling the logits. With 3 classes the denominator is z_pi1 - z_pi3;
    with 2 it is 1 (the plain margin)."""
    num_classes = logits.shape[-1]
    z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    z_t = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    z_sorted = -jnp.sort(-logits, axis=1)
    if num_classes >= 4:
        scale = z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3])
    elif num_classes == 3:
        scale = z_sorted[:, 0] - z_sorted[:, 2]
    else:
        scale = jnp.ones_like(z_y)
    return -(z_y - z_t) / (scale + 1e-12)


def _loss_and_grad(predict, variables, x, y, target, loss):
    """(per-example loss [N], logits [N, C], d sum(loss) / dx [N, ...])."""
    def total(x_):
        logits = predict(variables, x_)
        if loss == "ce":
            per = cross_entropy_per_example(logits, y)
        else:
            per = dlr_targeted_per_example(logits, y, target)
        return jnp.sum(per), (per, logits)
    (_, (per, logits)), g = jax.value_and_grad(total, has_aux=True)(x)
    return per, logits, g


# --------------------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------------------
def loop_mode(requested="auto"):
    """'host' (a Python loop over a jitted step) on CPU, 'fori' (one jitted lax.fori_loop)
    elsewhere; the environment variable NTK_ATTACK_LOOP=fori|host overrides it. A `requested`
    'fori' or 'host' (a script's --loop) is returned as it is."""
    for name, value in (("the loop", requested), ("NTK_ATTACK_LOOP", os.environ.get("NTK_ATTACK_LOOP", "auto"))):
        if value not in ("auto", "fori", "host"):
            raise ValueError(f"{name} must be auto, fori or host (got {value!r})")
        if value != "auto":
            return value
    return "host" if jax.default_backend() == "cpu" else "fori"


def _iterate(step_jit, fori_jit, lo, hi, state, *args, **static):
    """state <- step(i, state, *args, **static) for i in [lo, hi): `fori_jit` runs the whole loop
    in one jitted fori_loop, or the host dispatches `step_jit` once per i (see the module doc)."""
    if lo >= hi:
        return state
    if loop_mode() == "fori" or any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves(state)):
        return fori_jit(lo, hi, state, *args, **static)
    for i in range(lo, hi):
        state = step_jit(jnp.asarray(i, jnp.int32), state, *args, **static)
    return state


def _fori(step, static_argnames):
    """The jitted fori_loop of `step(i, state, *args)` over [lo, hi)."""
    @functools.partial(jax.jit, static_argnames=static_argnames)
    def run(lo, hi, state, *args, **static):
        return jax.lax.fori_loop(lo, hi, lambda i, st: step(i, st, *args, **static), state)
    return run


# --------------------------------------------------------------------------------------
# PGD
# --------------------------------------------------------------------------------------
def _pgd_step(i, x_adv, variables, x, y, eps, step_size, *, predict, norm, clip_iterates=True):
    del i
    g = jax.grad(_xent_sum, argnums=2)(predict, variables, x_adv, y)
    x_adv = x_adv + step_size * _ascent_direction(g, norm)
    if not clip_iterates:  # L-inf only (pgd checks): back into the ball, [0, 1] left to the end
        return x + jnp.clip(x_adv - x, -eps, eps)
    return project(x_adv, x, eps, norm)  # clip to [0,1], then back into the ball


_PGD_STATIC = ("predict", "norm", "clip_iterates")
_pgd_step_jit = jax.jit(_pgd_step, static_argnames=_PGD_STATIC)
_pgd_fori = _fori(_pgd_step, _PGD_STATIC)
_random_start_jit = jax.jit(random_start, static_argnames=("norm",))


def pgd(predict, variables, x, y, key, eps, step_size, *, steps, norm="linf", with_half=False, random_start=True,
        clip_iterates=True):
    """Projected gradient descent on the cross-entropy (Madry et al., ICLR 2018).

    One seeded random start (the clean image without `random_start`), then `steps` steps of
      L-inf: x <- x + step_size * sign(grad);   L2: x <- x + step_size * grad / ||grad||,
    each followed by a clip to [0, 1] and a projection onto the eps-ball around x. Without
    `clip_iterates` (L-inf only), each step is only projected onto the eps-ball and the images
    returned are clipped to [0, 1] at the end, as Tsilivis & Kempe's training PGD does.
    Each step is jitted (see the module doc for how they are looped); `steps` is not part of
    any compiled shape, so PGD-20 and PGD-100 share their executables. Returns adversarial
    images, same shape as x; with `with_half`, (those, the iterate after steps // 2) (for the
    more-steps sanity check).
    """
    x = jnp.asarray(x, jnp.float32)
    args = (variables, x, y, eps, step_size)
    x_adv = _random_start_jit(key, x, eps, norm) if random_start else x
    static = {"predict": predict, "norm": norm}
    if not clip_iterates:
        if norm != "linf":
            raise ValueError("clip_iterates=False is for the L-inf PGD")
        static["clip_iterates"] = False
    x_half = _iterate(_pgd_step_jit, _pgd_fori, 0, steps // 2, x_adv, *args, **static)
    x_last = _iterate(_pgd_step_jit, _pgd_fori, steps // 2, steps, x_half, *args, **static)
    if not clip_iterates:
        x_half, x_last = jnp.clip(x_half, 0.0, 1.0), jnp.clip(x_last, 0.0, 1.0)
    return (x_last, x_half) if with_half else x_last


# --------------------------------------------------------------------------------------
# Running attacks
# --------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("predict",))
def _predict_labels(predict, variables, x):
    return jnp.argmax(predict(variables, x), -1)


@functools.partial(jax.jit, static_argnames=("predict",))
def _zero_input_grad(predict, variables, x, y):
    """[N] bool: the cross-entropy's input gradient is exactly zero (or not finite)."""
    g = jax.grad(_xent_sum, argnums=2)(predict, variables, x.astype(jnp.float32), y)
    flat = g.reshape(g.shape[0], -1)
    return jnp.all(flat == 0, axis=1) | ~jnp.all(jnp.isfinite(flat), axis=1)


def _runs(cfg: AttackConfig, num_classes):
    """(target_rank, restart) of every run of one single attack."""
    if cfg.name in ("apgd-dlr", "fab-t"):
        n_targets = max(1, min(cfg.n_targets, num_classes - 1))
        return [(t, r) for t in range(n_targets) for r in range(cfg.restarts)]
    return [(0, r) for r in range(cfg.restarts)]


def _num_classes(predict, variables, x):
    return int(jax.eval_shape(predict, variables, x[:1]).shape[-1])


def _run_member(predict, variables, x, y, key, cfg: AttackConfig, m_idx, valid, num_classes):
    """Every run (restart, target) of the single attack `cfg` on one batch; runs after the first
    are skipped once every `valid` row is fooled. Keys: PGD fold_in(key, restart) (as the
    reference-style evaluator); the others fold_in(fold_in(key, 1000 + member index), run index).
    Returns (x_adv [N, ...]: per example the output of the first run that fools it, else of the
    last run; fooled [N] bool (host); half_fooled [N] bool (host; PGD stopped at steps // 2) or
    None)."""
    import autoattack   # here rather than at the top: autoattack imports this module
    y_host = parallel.to_host(y)
    x_out, fooled, half = None, np.zeros(len(y_host), bool), None
    for run_idx, (target_rank, restart) in enumerate(_runs(cfg, num_classes)):
        if run_idx > 0 and np.all(fooled[valid]):
            break
        k = (jax.random.fold_in(key, restart) if cfg.name == "pgd" else
             jax.random.fold_in(jax.random.fold_in(key, 1000 + m_idx), run_idx))
        if cfg.name == "pgd":
            x_run, x_half = pgd(predict, variables, x, y, k, cfg.eps, cfg.step_size, steps=cfg.steps, norm=cfg.norm,
                                with_half=True)
            h = parallel.to_host(_predict_labels(predict, variables, x_half)) != y_host
            half = h if half is None else half | h
        elif cfg.name in ("apgd-ce", "apgd-dlr"):
            x_run = autoattack.apgd(predict, variables, x, y, k, cfg.eps, steps=cfg.steps, norm=cfg.norm,
                                    loss="ce" if cfg.name == "apgd-ce" else "dlr-t", target_rank=target_rank)
        elif cfg.name == "fab-t":
            x_run = autoattack.fab_t(predict, variables, x, y, k, cfg.eps, steps=cfg.fab_steps, norm=cfg.norm,
                                     target_rank=target_rank, random_start=restart > 0)
        else:
            x_run = autoattack.square(predict, variables, x, y, k, cfg.eps, queries=cfg.square_queries,
                                      norm=cfg.norm, p_init=cfg.square_p_init, valid=valid)
        # keep the first fooling point; robust examples take the latest run's output
        x_out = x_run if x_out is None else jnp.where(_bcast(jnp.asarray(fooled), x_run), x_out, x_run)
        fooled = fooled | (parallel.to_host(_predict_labels(predict, variables, x_run)) != y_host)
    return x_out, fooled, half


def _device_batch(arrays, rows, batch_size):
    """The rows `rows` (a slice or index array) of host arrays, zero-padded to
    parallel.padded_size(batch_size) and split over the devices. Returns (sharded arrays,
    valid [size] bool marking the real rows)."""
    size = parallel.padded_size(batch_size)
    taken = [np.asarray(a[rows]) for a in arrays]
    sharded, _ = parallel.shard_batch(tuple(parallel.pad_rows(t, size) for t in taken))
    return sharded, np.arange(size) < len(taken[0])


def _attack_rows(predict, variables, x, y, cfg: AttackConfig, key, *, batch_size, num_classes, correct_clean,
                 progress=None):
    """Every member of `cfg` over host arrays x [n, ...] (float32) and y [n] (int32), in padded
    batches of `batch_size`; batch c of every member draws its randomness from fold_in(key, c).
    Members attack every example, or, for an ensemble on survivors (`cfg.on_survivors`), only the
    examples that are correctly classified (`correct_clean` [n] bool) and not yet fooled, re-batched.

    Returns a dict: 'x_adv' [n, ...] host float32 (per example the first fooling point found, in
    member order; else the last run's output; clean mistakes skipped on survivors keep x);
    'fooled' [n] bool; 'members' [(name, attacked [n] bool, fooled [n] bool)] in order;
    'pgd_half_fooled' [n] bool when pgd ran."""
    n = len(y)
    fooled = ~np.asarray(correct_clean, bool) if cfg.on_survivors else np.zeros(n, bool)
    x_adv = np.array(x, np.float32, copy=True)
    out = {"members": []}
    for m_idx, member in enumerate(cfg.members()):
        rows = np.flatnonzero(~fooled) if cfg.on_survivors else np.arange(n)
        if progress is not None and len(rows) < n:
            progress.update(n - len(rows))
        m_fooled = np.zeros(n, bool)
        for c, start in enumerate(range(0, len(rows), batch_size)):
            idx = rows[start:start + batch_size]
            (xb, yb), valid = _device_batch((x, y), idx, batch_size)
            x_run, run_fooled, half = _run_member(predict, variables, xb, yb, jax.random.fold_in(key, c), member,
                                                  m_idx, valid, num_classes)
            x_run = parallel.to_host(x_run)[:len(idx)]
            keep = fooled[idx].reshape((-1,) + (1,) * (x.ndim - 1))
            x_adv[idx] = np.where(keep, x_adv[idx], x_run)
            m_fooled[idx] = run_fooled[:len(idx)]
            if half is not None:
                out.setdefault("pgd_half_fooled", np.zeros(n, bool))[idx] |= half[:len(idx)]
            if progress is not None:
                progress.update(len(idx))
        attacked = np.zeros(n, bool)
        attacked[rows] = True
        out["members"].append((member.name, attacked, m_fooled))
        fooled = fooled | m_fooled
    out.update(x_adv=x_adv, fooled=fooled)
    return out


# --------------------------------------------------------------------------------------
# Evaluation over a dataset
# --------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("components",))
def _components_jit(components, variables, x):
    return components(variables, x)


def _predict_pass(predict, variables, x, y, batch_size, *, components=None, check_gradients=False, progress=None):
    """Predicted labels [n] over host arrays in order, in padded batches; with `components` also
    their {'f', 'df'} [n, C]; with `check_gradients` also the number of inputs whose
    cross-entropy input gradient is exactly zero."""
    host = parallel.to_host
    preds, comps, zero_grad = [], [], 0
    for start in range(0, len(x), batch_size):
        m = min(batch_size, len(x) - start)
        (xb, yb), _ = _device_batch((x, y), slice(start, start + batch_size), batch_size)
        preds.append(host(_predict_labels(predict, variables, xb))[:m])
        if components is not None:
            comps.append(jax.tree_util.tree_map(lambda a: host(a)[:m], _components_jit(components, variables, xb)))
        if check_gradients:
            zero_grad += int(np.sum(host(_zero_input_grad(predict, variables, xb, yb))[:m]))
        if progress is not None:
            progress.update(m)
    out = {"predictions": np.concatenate(preds), "zero_grad": zero_grad if check_gradients else None}
    if components is not None:
        out["components"] = {k: np.concatenate([p[k] for p in comps]) for k in ("f", "df")}
    return out


def _breakdown(res, n, correct_clean, on_survivors):
    """Per member, in order: on every example {'correct', 'acc'} (that member alone), on survivors
    {'attacked', 'fooled'} (examples it attacked, and fooled of those); both with
    'cumulative_correct', 'cumulative_acc' (robust to it and every member before it)."""
    survived = np.asarray(correct_clean, bool).copy() if on_survivors else np.ones(n, bool)
    breakdown = {}
    for name, attacked, fooled in res["members"]:
        survived &= ~fooled
        b = ({"attacked": int(np.sum(attacked)), "fooled": int(np.sum(fooled & attacked))} if on_survivors else
             {"correct": int(np.sum(~fooled)), "acc": float(np.mean(~fooled)) if n else 0.0})
        b.update(cumulative_correct=int(np.sum(survived)), cumulative_acc=float(np.mean(survived)) if n else 0.0)
        breakdown[name] = b
    if "pgd_half_fooled" in res and "pgd" in breakdown:
        breakdown["pgd"]["correct_half_steps"] = int(np.sum(~res["pgd_half_fooled"]))
    if on_survivors and "square" in breakdown and any(name in GRADIENT_ATTACKS for name in breakdown):
        sq = breakdown["square"]
        sq["masking_threshold"] = square_warn_threshold(n)
        sq["masking_suspected"] = sq["fooled"] > sq["masking_threshold"]
    return breakdown


def square_warn_threshold(n):
    """Square may fool up to this many of n examples after the gradient attacks without a warning."""
    return max(SQUARE_WARN_MIN, int(np.ceil(SQUARE_WARN_FRACTION * n)))


def sanity_warnings(out, attack: AttackConfig | None):
    """The sanity checks of an `evaluate` result, as a list of human-readable strings:
    robust accuracy above clean (overall and per attack); PGD robust on more examples after all
    its steps than after half of them; APGD-CE leaving more than max(1, 0.5%) examples more
    robust than PGD in the ensemble; zero input gradients (a sign of gradient masking) on more
    than 1% of the inputs; Square (no gradients), run after the gradient attacks, fooling more
    than `square_warn_threshold(n)` examples they left robust (also a sign of masking)."""
    warnings = []
    n = max(out["n"], 1)
    frac = out["zero_grad_count"] / n if out.get("zero_grad_count") is not None else 0.0
    if out.get("zero_grad_count") and frac > ZERO_GRAD_WARN_FRACTION:
        warnings.append(f"gradient masking? the input gradient of the cross-entropy is exactly zero "
                        f"(or not finite) on {out['zero_grad_count']}/{out['n']} inputs ({100 * frac:.1f}%): "
                        f"gradient attacks cannot move those; try --attack square or ensemble")
    if attack is None:
        return warnings
    if out["correct_adv"] > out["correct_clean"]:
        warnings.append(f"robust accuracy {out['acc_adv']:.4f} exceeds clean accuracy "
                        f"{out['acc_clean']:.4f}: the attack is broken or too weak")
    breakdown = out.get("attacks", {})
    for name, b in breakdown.items():
        if len(breakdown) > 1 and b.get("correct", 0) > out["correct_clean"]:
            warnings.append(f"{name}: robust accuracy {b['acc']:.4f} exceeds clean accuracy {out['acc_clean']:.4f}")
    pgd_b = breakdown.get("pgd")
    if pgd_b is not None and "correct_half_steps" in pgd_b and pgd_b["correct"] > pgd_b["correct_half_steps"]:
        warnings.append(f"pgd: more steps raised robust accuracy ({pgd_b['correct_half_steps']} robust after "
                        f"{attack.steps // 2} steps, {pgd_b['correct']} after {attack.steps}): the fixed step "
                        f"size oscillates; prefer --attack apgd-ce or ensemble")
    ce_b = breakdown.get("apgd-ce")
    # Different random starts find different local maxima, so allow max(1, 0.5%) examples.
    tolerance = max(1, int(np.ceil(0.005 * n)))
    if pgd_b is not None and ce_b is not None and "correct" in ce_b and ce_b["correct"] > pgd_b["correct"] + tolerance:
        warnings.append(f"apgd-ce left more examples robust ({ce_b['correct']}) than pgd ({pgd_b['correct']}) "
                        f"with the same budget")
    sq = breakdown.get("square", {})
    if sq.get("masking_suspected"):
        before = [name for name in breakdown if name in GRADIENT_ATTACKS]
        warnings.append(f"gradient masking? square, which uses no gradients, fooled {sq['fooled']} of the "
                        f"{sq['attacked']} examples that {', '.join(before)} left robust (more than "
                        f"{sq['masking_threshold']} of {out['n']}): robust accuracy from gradient attacks alone "
                        f"is not to be trusted on this model")
    return warnings


def evaluate(predict, variables, x, y, *, batch_size=100, attack: AttackConfig | None = None,
             key=None, keep_examples=False, progress=None, components=None, check_gradients=True):
    """Clean (and, with `attack`, robust) accuracy over arrays, in order, in batches.

    Batches are padded to `batch_size` (so nothing recompiles) and only their real rows are
    counted. With several devices (parallel.py) every batch is padded the same way to a multiple
    of the device count and split over the devices, and `variables` are replicated (the padding
    leaves the real rows' random draws unchanged: JAX's default partitionable threefry draws row
    i the same whatever the number of rows). The attack runs member by member over the whole set
    (batch c of every member with key fold_in(key, c)); an ensemble on survivors re-batches the
    examples still robust before each member, as AutoAttack does. `progress` (e.g. a tqdm bar)
    advances by images: clean images without an attack, else images per member (its `total` is
    set to n times the number of members).
    `components(variables, x) -> {'f','df'}` (see `make_components`), when given, is evaluated
    on the clean and adversarial images. Returns a dict:
      'n', 'correct_clean', 'acc_clean', 'predictions_clean' [N];
      'zero_grad_count' (inputs whose cross-entropy input gradient is exactly zero; None when
        `check_gradients` is False), 'warnings' (list of str, see `sanity_warnings`);
      with an attack: 'correct_adv', 'acc_adv', 'predictions_adv' [N], 'attack' (its
        `describe()`), 'attacks' {member: see `_breakdown`; plus 'correct_half_steps' for pgd,
        and 'masking_threshold', 'masking_suspected' for square after gradient attacks},
        optionally 'x_adv' [N, H, W, C];
      with components: 'components_clean' and (with an attack) 'components_adv', each
        {'f': [N, C], 'df': [N, C]}.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    n = len(x)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    variables = parallel.replicate(variables)
    clean = _predict_pass(predict, variables, x, y, batch_size, components=components,
                          check_gradients=check_gradients, progress=progress if attack is None else None)
    out = {"n": n, "predictions_clean": clean["predictions"], "zero_grad_count": clean["zero_grad"]}
    out["correct_clean"] = int(np.sum(out["predictions_clean"] == y))
    out["acc_clean"] = out["correct_clean"] / max(n, 1)
    if components is not None:
        out["components_clean"] = clean["components"]
    if attack is not None:
        members = attack.members()
        if progress is not None and hasattr(progress, "total"):
            progress.total = n * len(members)
            getattr(progress, "refresh", lambda: None)()
        num_classes = (_num_classes(predict, variables, jnp.asarray(x[:1]))
                       if any(m.name in ("apgd-dlr", "fab-t") for m in members) else None)
        res = _attack_rows(predict, variables, x, y, attack, key, batch_size=batch_size, num_classes=num_classes,
                           correct_clean=out["predictions_clean"] == y, progress=progress)
        adv = _predict_pass(predict, variables, res["x_adv"], y, batch_size, components=components)
        out["attack"] = attack.describe()
        out["predictions_adv"] = adv["predictions"]
        out["correct_adv"] = int(np.sum(out["predictions_adv"] == y))
        out["acc_adv"] = out["correct_adv"] / max(n, 1)
        out["attacks"] = _breakdown(res, n, out["predictions_clean"] == y, attack.on_survivors)
        if components is not None:
            out["components_adv"] = adv["components"]
        if keep_examples:
            out["x_adv"] = res["x_adv"]
    out["warnings"] = sanity_warnings(out, attack)
    return out


# --------------------------------------------------------------------------------------
# Evaluating a checkpoint (eval_and_make_adv.py)
# --------------------------------------------------------------------------------------
RANGE_TOLERANCE = 1e-5   # pixel values read back may carry float rounding from the attack's arithmetic


def load_test_pickle(path, input_shape, num_classes):
    """Read and check a --test_path pickle {'images': N x C x H x W in [0, 1], 'labels': N} (the
    adv_examples_*.pkl that eval_and_make_adv.py writes). Returns (images NHWC float32, labels int32)."""
    check_file(path, "--test_path", "a pickle of images and labels", hints=("adv_examples_*.pkl",))
    obj = decode_keys(restricted_load(path))
    if not isinstance(obj, dict) or "images" not in obj or "labels" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"--test_path {path} must hold a dict with 'images' and 'labels'; found {keys}")
    images, labels = np.asarray(obj["images"]), np.asarray(obj["labels"])
    h, w, c = input_shape
    if images.ndim != 4:
        raise UserError(f"--test_path images must be N x C x H x W; got shape {images.shape}")
    if images.shape[1] != c and images.shape[3] == c:
        raise UserError(f"--test_path images look N x H x W x C {images.shape}; they must be N x C x H x W "
                        f"(transpose with images.transpose(0, 3, 1, 2))")
    if tuple(images.shape[1:]) != (c, h, w):
        raise UserError(f"--test_path images have shape {images.shape[1:]} per image but the model takes "
                        f"{(c, h, w)} (C x H x W)")
    if len(images) == 0:
        raise UserError(f"--test_path {path} holds no images")
    if not (np.issubdtype(images.dtype, np.floating) or np.issubdtype(images.dtype, np.integer)):
        raise UserError(f"--test_path images must be numbers; got dtype {images.dtype}")
    images = images.astype(np.float32)
    if not np.all(np.isfinite(images)):
        raise UserError("--test_path images hold NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise UserError(f"--test_path pixel values must lie in [0, 1]; found [{lo:g}, {hi:g}]"
                        + (" (uint8 images? divide by 255)" if hi > 1.5 else ""))
    images = np.clip(images, 0.0, 1.0)
    if labels.shape != (len(images),):
        raise UserError(f"--test_path labels must be a vector of {len(images)} ints; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
            raise UserError(f"--test_path labels must be integers; got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"--test_path labels must lie in [0, {num_classes - 1}]; found "
                        f"[{labels.min()}, {labels.max()}]")
    return images.transpose(0, 2, 3, 1), labels.astype(np.int32)


def parameter_notes(meta, dynamics):
    """Warnings for evaluating a checkpoint with `meta` under `dynamics` that may not be what the
    user meant: --linear on a phase-1 checkpoint, or dynamics other than the trained ones."""
    notes = []
    trained = meta.get("dynamics")
    if dynamics in ("linear", "centered") and meta.get("phase") == 1:
        notes.append("this is a phase-1 checkpoint: --linear expands around the trained 'params' "
                     "towards 'lin_params' (the initial parameters in a constant save, the same "
                     "parameters in a final one)")
    if trained is not None and trained != dynamics:
        notes.append(f"the checkpoint was trained with {trained} dynamics but is evaluated with {dynamics} "
                     f"(check --linear/--centering)")
    return notes


def evaluate_network(net, dynamics, x, y, attack: AttackConfig | None, *, seed, batch_size, keep_examples=False,
                     progress=None):
    """`evaluate` of a checkpoint opened as a network (`checkpoints.open_network`) under `dynamics`,
    with its f/df components, keyed by PRNGKey(seed). Without an attack the robust fields repeat
    the clean ones and the 'adversarial' images 'x_adv' are the clean ones."""
    theta, theta0 = net.parameters(dynamics)
    res = evaluate(make_predict(net.apply, dynamics), (theta, theta0, net.ckpt["net_state"]), x, y,
                   batch_size=batch_size, attack=attack, key=jax.random.PRNGKey(seed),
                   keep_examples=keep_examples and attack is not None, progress=progress,
                   components=make_components(net.apply, dynamics))
    if attack is None:
        res["acc_adv"], res["correct_adv"] = res["acc_clean"], res["correct_clean"]
        res["predictions_adv"], res["components_adv"] = res["predictions_clean"], res["components_clean"]
        res["x_adv"] = np.asarray(x, np.float32)
    return res


def summary_fields(res, attack: AttackConfig | None, eps_255=None):
    """The attack and accuracy fields of an evaluation's JSON summary, from an `evaluate_network`
    result: the attack's settings (eps_255: the L-inf radius in 1/255 units as given), its
    `describe()`, the accuracies and counts, the per-attack breakdown, the inputs of zero gradient
    and the warnings. Without an attack the settings and the robust figures are None."""
    settings = {} if attack is None else {
        "attack": attack.name, "norm": attack.norm, "eps": attack.eps,
        "eps_255": eps_255 if attack.norm == "linf" else None, "steps": attack.steps,
        "step_size": attack.step_size, "restarts": attack.restarts}
    return {
        **{k: settings.get(k) for k in ("attack", "norm", "eps", "eps_255", "steps", "step_size", "restarts")},
        "attack_config": res.get("attack"),
        "acc_clean": res["acc_clean"], "acc_robust": None if attack is None else res["acc_adv"],
        "correct_clean": res["correct_clean"], "correct_robust": None if attack is None else res["correct_adv"],
        "per_attack": res.get("attacks", {}), "zero_grad_inputs": res["zero_grad_count"],
        "warnings": res["warnings"],
    }
