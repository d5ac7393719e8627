"""Adversarial attacks and evaluation under attack.

Every attack takes a `predict(variables, x) -> logits` function, built once per dynamics
(see `make_predict`), so the same code attacks standard, linearized and centered models.
BatchNorm always runs in inference mode here, and the state returned by the network is
discarded, so an attack can never move the running statistics.

Attacks (`AttackConfig.name`, `--attack`):
- `pgd`:      PGD on the cross-entropy (Madry et al., ICLR 2018), fixed step, one random start
              per restart. This is the reference's evaluation, and its counting: an example is
              robust if the attack's last iterate is classified correctly.
- `apgd-ce`:  Auto-PGD on the cross-entropy (Croce & Hein, ICML 2020).
- `apgd-dlr`: Auto-PGD on the *targeted* DLR loss (the paper's APGD-T), run once per target:
              the top-`n_targets` other classes of the clean logits, in order.
- `ensemble`: pgd, then apgd-ce, then apgd-dlr. An example is robust only if it survives all.
The APGD attacks follow AutoAttack's counting: an example misclassified when clean is not
robust (the clean image is itself a point of the eps-ball).

With `restarts > 1` every attack runs again from fresh random starts, and an example counts as
robust only if it survives every restart (and, for apgd-dlr, every target).

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

ENSEMBLE = ("pgd", "apgd-ce", "apgd-dlr")   # the order the ensemble runs its members in
APGD_MOMENTUM = 0.75   # alpha of Croce & Hein (2020), eq. (2)
APGD_RHO = 0.75        # rho of condition 1: fraction of steps that must raise the loss
ZERO_GRAD_WARN_FRACTION = 0.01  # warn about gradient masking above this fraction of inputs


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
    step (APGD starts at 2*eps and adapts); steps: iterations per run; name: one of ATTACKS;
    restarts: random restarts per attack (and per target for apgd-dlr); n_targets: target
    classes of apgd-dlr (capped at num_classes - 1).
    """
    norm: str = "linf"        # 'linf' or 'l2'
    eps: float = 4 / 255
    step_size: float = 2 * 4 / 255 / 100
    steps: int = 100
    name: str = "pgd"
    restarts: int = 1
    n_targets: int = 9

    def __post_init__(self):
        if self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; choose one of {', '.join(ATTACKS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.steps < 1 or self.restarts < 1 or self.n_targets < 1:
            raise ValueError("steps, restarts and n_targets must be >= 1")

    def members(self):
        """The single attacks this config runs, in order (one, or three for the ensemble)."""
        names = ENSEMBLE if self.name == "ensemble" else (self.name,)
        return tuple(dataclasses.replace(self, name=n) for n in names)

    def describe(self):
        d = {"attack": self.name, "norm": self.norm, "eps": self.eps, "step_size": self.step_size,
             "steps": self.steps, "restarts": self.restarts}
        if self.name in ("apgd-dlr", "ensemble"):
            d["n_targets"] = self.n_targets
        if self.name != "pgd":
            d["apgd_initial_step"] = 2 * self.eps
        if self.name == "ensemble":
            d["members"] = list(ENSEMBLE)
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
                        n_targets=int(getattr(args, "n_target_classes", 9) or 9))


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------
def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) + 1e-12).reshape((-1,) + (1,) * (v.ndim - 1))


def _bcast(mask, x):
    """A per-example [N] array shaped to broadcast against x [N, ...]."""
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


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
def loop_mode():
    """'host' (a Python loop over a jitted step) on CPU, 'fori' (one jitted lax.fori_loop)
    elsewhere; the environment variable NTK_ATTACK_LOOP=fori|host overrides it."""
    mode = os.environ.get("NTK_ATTACK_LOOP", "auto")
    if mode not in ("auto", "fori", "host"):
        raise ValueError(f"NTK_ATTACK_LOOP must be auto, fori or host (got {mode!r})")
    if mode == "auto":
        return "host" if jax.default_backend() == "cpu" else "fori"
    return mode


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
def _pgd_step(i, x_adv, variables, x, y, eps, step_size, *, predict, norm):
    del i
    g = jax.grad(_xent_sum, argnums=2)(predict, variables, x_adv, y)
    x_adv = x_adv + step_size * _ascent_direction(g, norm)
    return project(x_adv, x, eps, norm)  # clip to [0,1], then back into the ball


_PGD_STATIC = ("predict", "norm")
_pgd_step_jit = jax.jit(_pgd_step, static_argnames=_PGD_STATIC)
_pgd_fori = _fori(_pgd_step, _PGD_STATIC)
_random_start_jit = jax.jit(random_start, static_argnames=("norm",))


def _pgd_iterates(predict, variables, x, y, key, eps, step_size, steps, norm, half):
    """The last PGD iterate, and with `half` also the iterate after steps // 2."""
    x = jnp.asarray(x, jnp.float32)
    x_adv = _random_start_jit(key, x, eps, norm)
    args = (variables, x, y, eps, step_size)
    x_half = _iterate(_pgd_step_jit, _pgd_fori, 0, steps // 2, x_adv, *args, predict=predict, norm=norm)
    x_last = _iterate(_pgd_step_jit, _pgd_fori, steps // 2, steps, x_half, *args, predict=predict, norm=norm)
    return (x_last, x_half) if half else x_last


def pgd(predict, variables, x, y, key, eps, step_size, *, steps, norm="linf"):
    """Projected gradient descent on the cross-entropy (Madry et al., ICLR 2018).

    One seeded random start, then `steps` steps of
      L-inf: x <- x + step_size * sign(grad);   L2: x <- x + step_size * grad / ||grad||,
    each followed by a clip to [0, 1] and a projection onto the eps-ball around x.
    Each step is jitted (see the module doc for how they are looped); `steps` is not part of
    any compiled shape, so PGD-20 and PGD-100 share their executables. Returns adversarial
    images, same shape as x.
    """
    return _pgd_iterates(predict, variables, x, y, key, eps, step_size, steps, norm, half=False)


def _pgd_with_half(predict, variables, x, y, key, eps, step_size, *, steps, norm="linf"):
    """`pgd` that also returns its iterate after steps // 2 (for the more-steps sanity check)."""
    return _pgd_iterates(predict, variables, x, y, key, eps, step_size, steps, norm, half=True)


# --------------------------------------------------------------------------------------
# APGD (Croce & Hein, ICML 2020)
# --------------------------------------------------------------------------------------
def apgd_checkpoints(steps):
    """The iterations after which APGD may halve its step: w_j = ceil(p_j * steps) with
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), for p_j <= 1.
    Returns sorted distinct ints in [1, steps]."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1.0:
            break
        p.append(nxt)
    w = sorted({int(np.ceil(pj * steps - 1e-9)) for pj in p[1:]})
    return [c for c in w if 1 <= c <= steps]


def _checkpoint_tables(steps):
    """is_check[i] (bool [steps]): iteration i (0-based) ends at a checkpoint w_j = i + 1;
    window[i] (float [steps]): w_j - w_{j-1} there (0 elsewhere)."""
    is_check = np.zeros(steps, bool)
    window = np.zeros(steps, np.float32)
    prev = 0
    for w in apgd_checkpoints(steps):
        is_check[w - 1] = True
        window[w - 1] = w - prev
        prev = w
    return is_check, window


def _apgd_where(mask, a, b):
    return jnp.where(_bcast(mask, a), a, b)


@functools.partial(jax.jit, static_argnames=("predict", "norm", "loss"))
def _apgd_init(predict, variables, x, y, key, eps, target_rank, *, norm, loss):
    """(target [N], initial loop state) of APGD."""
    logits_clean = predict(variables, x)
    other = jnp.where(jax.nn.one_hot(y, logits_clean.shape[-1], dtype=bool), -jnp.inf, logits_clean)
    target = jnp.argsort(-other, axis=1)[:, target_rank]
    x0 = random_start(key, x, eps, norm)
    l0, logits0, g0 = _loss_and_grad(predict, variables, x0, y, target, loss)
    fooled_clean = jnp.argmax(logits_clean, -1) != y
    fooled0 = jnp.argmax(logits0, -1) != y
    x_out = _apgd_where(fooled_clean, x, _apgd_where(fooled0, x0, x))  # first misclassified point found
    fooled = fooled_clean | fooled0
    eta = jnp.full((x.shape[0],), 2.0 * eps, jnp.float32)
    return target, (x0, x0, g0, l0, x0, g0, l0, eta, jnp.zeros(x.shape[0], jnp.int32), l0,
                    jnp.zeros(x.shape[0], bool), x_out, fooled)


def _apgd_step(i, s, variables, x, y, target, eps, is_check, window, *, predict, norm, loss):
    """One APGD iteration i (0-based) on the loop state s."""
    where = _apgd_where
    (x_cur, x_prev, g_cur, l_cur, x_best, g_best, l_best, eta, n_up, l_best_ck, halved_ck,
     x_out, fooled) = s
    a = jnp.where(i == 0, 1.0, APGD_MOMENTUM)
    z = project(x_cur + _bcast(eta, x_cur) * _ascent_direction(g_cur, norm), x, eps, norm)
    x_new = project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - x_prev), x, eps, norm)
    l_new, logits, g_new = _loss_and_grad(predict, variables, x_new, y, target, loss)

    hit = (jnp.argmax(logits, -1) != y) & ~fooled   # keep the first misclassified point
    x_out = where(hit, x_new, x_out)
    fooled = fooled | hit
    n_up = n_up + (l_new > l_cur)
    better = l_new > l_best                          # keep the point of highest loss
    x_best, g_best = where(better, x_new, x_best), where(better, g_new, g_best)
    l_best = jnp.where(better, l_new, l_best)
    x_prev, x_cur, g_cur, l_cur = x_cur, x_new, g_new, l_new

    # Checkpoint w_j: halve the step where one of the two conditions holds, and restart
    # those examples from their best point (with no momentum).
    ck = is_check[i]
    cond1 = n_up < APGD_RHO * window[i]
    cond2 = ~halved_ck & (l_best_ck >= l_best)
    halve = ck & (cond1 | cond2)
    eta = jnp.where(halve, 0.5 * eta, eta)
    x_cur, x_prev = where(halve, x_best, x_cur), where(halve, x_best, x_prev)
    g_cur, l_cur = where(halve, g_best, g_cur), jnp.where(halve, l_best, l_cur)
    n_up = jnp.where(ck, 0, n_up)
    halved_ck = jnp.where(ck, halve, halved_ck)
    l_best_ck = jnp.where(ck, l_best, l_best_ck)
    return (x_cur, x_prev, g_cur, l_cur, x_best, g_best, l_best, eta, n_up, l_best_ck,
            halved_ck, x_out, fooled)


_APGD_STATIC = ("predict", "norm", "loss")
_apgd_step_jit = jax.jit(_apgd_step, static_argnames=_APGD_STATIC)
_apgd_fori = _fori(_apgd_step, _APGD_STATIC)


def apgd(predict, variables, x, y, key, eps, *, steps, norm="linf", loss="ce", target_rank=0):
    """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
    of diverse parameter-free attacks", ICML 2020, Algorithm 1).

    loss 'ce': untargeted cross-entropy. loss 'dlr-t': targeted DLR loss towards the class of
    rank `target_rank` (0 = highest) among the other classes of the clean logits.
    From a seeded random start, `steps` iterations of
        z      = P(x_k + eta * dir(grad_k))
        x_k+1  = P(x_k + a (z - x_k) + (1 - a)(x_k - x_k-1)),  a = 1 at the first step, else 0.75
    with dir = sign (L-inf) or grad/||grad|| (L2) and P the clip to [0,1] and projection onto
    the eps-ball. The step starts at eta = 2 eps and, per example, halves at the checkpoints of
    `apgd_checkpoints` when (1) fewer than 75% of the steps since the last checkpoint raised the
    loss, or (2) the step was not halved at the last checkpoint and the best loss has not risen
    since; the iterate then restarts from the best point.

    Returns x_adv [N, ...]: per example, the first iterate that is misclassified (the clean
    image itself if it already is), otherwise the iterate of highest loss. Inside the eps-ball
    and [0, 1].
    """
    x = jnp.asarray(x, jnp.float32)
    is_check, window = (jnp.asarray(t) for t in _checkpoint_tables(steps))
    target, init = _apgd_init(predict, variables, x, y, key, eps, target_rank, norm=norm, loss=loss)
    s = _iterate(_apgd_step_jit, _apgd_fori, 0, steps, init, variables, x, y, target, eps, is_check, window,
                 predict=predict, norm=norm, loss=loss)
    x_best, x_out, fooled = s[4], s[11], s[12]
    return _apgd_where(fooled, x_out, x_best)


# --------------------------------------------------------------------------------------
# Running attacks on a batch
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
    """(loss, target_rank, restart) of every run of one single attack."""
    if cfg.name == "apgd-dlr":
        n_targets = max(1, min(cfg.n_targets, num_classes - 1))
        return [("dlr-t", t, r) for t in range(n_targets) for r in range(cfg.restarts)]
    return [("ce", 0, r) for r in range(cfg.restarts)]


def _num_classes(predict, variables, x):
    return int(jax.eval_shape(predict, variables, x[:1]).shape[-1])


def attack_batch(predict, variables, x, y, key, cfg: AttackConfig, valid=None, num_classes=None):
    """Run every attack of `cfg` (every restart, every target) on one batch.

    An example is fooled by a single attack if any of its runs misclassifies it (for the APGD
    attacks also if the clean image is misclassified); it is fooled by `cfg` if any member
    fools it. Runs after the first are skipped once every valid row is fooled by that attack.
    `valid` [N] bool marks the real rows of a padded batch (default: all). `num_classes` (the
    logits' width, used by apgd-dlr) is found by tracing `predict` when not given.

    Returns a dict of arrays:
      'x_adv' [N, ...]: per example the first fooling point found (in member order), else the
        last run's output;
      'fooled' [N] bool;
      'fooled_by' {member name: [N] bool}: each member on its own;
      'pgd_half_fooled' [N] bool: PGD stopped at steps // 2 (only when pgd is a member).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    valid = np.ones(len(y), bool) if valid is None else np.asarray(valid, bool)
    if num_classes is None and any(m.name == "apgd-dlr" for m in cfg.members()):
        num_classes = _num_classes(predict, variables, x)
    x_final, fooled = None, np.zeros(len(y), bool)
    fooled_by, out = {}, {}
    for m_idx, member in enumerate(cfg.members()):
        m_fooled = np.zeros(len(y), bool)
        for run_idx, (loss, target_rank, r) in enumerate(_runs(member, num_classes)):
            if run_idx > 0 and np.all(m_fooled[valid]):
                break
            if member.name == "pgd":
                # the same keys as the reference-style evaluator: fold_in(batch key, restart)
                x_run, x_half = _pgd_with_half(predict, variables, x, y, jax.random.fold_in(key, r),
                                               member.eps, member.step_size, steps=member.steps,
                                               norm=member.norm)
                half = parallel.to_host(_predict_labels(predict, variables, x_half)) != parallel.to_host(y)
                out["pgd_half_fooled"] = out.get("pgd_half_fooled", np.zeros(len(y), bool)) | half
            else:
                k = jax.random.fold_in(jax.random.fold_in(key, 1000 + m_idx), run_idx)
                x_run = apgd(predict, variables, x, y, k, member.eps, steps=member.steps,
                             norm=member.norm, loss=loss, target_rank=target_rank)
            run_fooled = parallel.to_host(_predict_labels(predict, variables, x_run)) != parallel.to_host(y)
            if x_final is None:
                x_final = x_run
            else:
                # keep the first fooling point; robust examples take the latest run's output
                keep = jnp.asarray(fooled)
                x_final = jnp.where(_bcast(keep, x_run), x_final, x_run)
            fooled = fooled | run_fooled
            m_fooled = m_fooled | run_fooled
        fooled_by[member.name] = m_fooled
    out.update({"x_adv": x_final, "fooled": fooled, "fooled_by": fooled_by})
    return out


def run_attack(predict, variables, x, y, key, cfg: AttackConfig):
    """Adversarial examples [N, ...] for one batch under `cfg`. With restarts (and targets,
    and several attacks in the ensemble) an example keeps the first point that fools the
    model; it counts as robust only if it survives all."""
    return attack_batch(predict, variables, x, y, key, cfg)["x_adv"]


# --------------------------------------------------------------------------------------
# Evaluation over a dataset
# --------------------------------------------------------------------------------------
def _pad(a, size):
    if len(a) == size:
        return a
    pad = np.zeros((size - len(a),) + a.shape[1:], a.dtype)
    return np.concatenate([a, pad])


@functools.partial(jax.jit, static_argnames=("components",))
def _components_jit(components, variables, x):
    return components(variables, x)


def sanity_warnings(out, attack: AttackConfig | None):
    """The sanity checks of an `evaluate` result, as a list of human-readable strings:
    robust accuracy above clean (overall and per attack); PGD robust on more examples after all
    its steps than after half of them; APGD-CE leaving more than max(1, 0.5%) examples more
    robust than PGD in the ensemble; zero input
    gradients (a sign of gradient masking) on more than 1% of the inputs."""
    warnings = []
    n = max(out["n"], 1)
    frac = out["zero_grad_count"] / n if out.get("zero_grad_count") is not None else 0.0
    if out.get("zero_grad_count") and frac > ZERO_GRAD_WARN_FRACTION:
        warnings.append(f"gradient masking? the input gradient of the cross-entropy is exactly zero "
                        f"(or not finite) on {out['zero_grad_count']}/{out['n']} inputs ({100 * frac:.1f}%): "
                        f"gradient attacks cannot move those; try --attack apgd-dlr or ensemble")
    if attack is None:
        return warnings
    if out["correct_adv"] > out["correct_clean"]:
        warnings.append(f"robust accuracy {out['acc_adv']:.4f} exceeds clean accuracy "
                        f"{out['acc_clean']:.4f}: the attack is broken or too weak")
    for name, b in out.get("attacks", {}).items():
        if len(out["attacks"]) > 1 and b["correct"] > out["correct_clean"]:
            warnings.append(f"{name}: robust accuracy {b['acc']:.4f} exceeds clean accuracy {out['acc_clean']:.4f}")
    pgd_b = out.get("attacks", {}).get("pgd")
    if pgd_b is not None and "correct_half_steps" in pgd_b and pgd_b["correct"] > pgd_b["correct_half_steps"]:
        warnings.append(f"pgd: more steps raised robust accuracy ({pgd_b['correct_half_steps']} robust after "
                        f"{attack.steps // 2} steps, {pgd_b['correct']} after {attack.steps}): the fixed step "
                        f"size oscillates; prefer --attack apgd-ce or ensemble")
    ce_b = out.get("attacks", {}).get("apgd-ce")
    # Different random starts find different local maxima, so allow max(1, 0.5%) examples.
    tolerance = max(1, int(np.ceil(0.005 * n)))
    if pgd_b is not None and ce_b is not None and ce_b["correct"] > pgd_b["correct"] + tolerance:
        warnings.append(f"apgd-ce left more examples robust ({ce_b['correct']}) than pgd ({pgd_b['correct']}) "
                        f"with the same budget")
    return warnings


def evaluate(predict, variables, x, y, *, batch_size=100, attack: AttackConfig | None = None,
             key=None, keep_examples=False, progress=None, components=None, check_gradients=True):
    """Clean (and, with `attack`, robust) accuracy over arrays, in order, in batches.

    The last partial batch is padded to `batch_size` (so nothing recompiles) and only its real
    rows are counted. With several devices (parallel.py) every batch is padded the same way to
    a multiple of the device count and split over the devices, and `variables` are replicated
    (the padding leaves the real rows' random starts unchanged: JAX's default partitionable
    threefry draws row i the same whatever the number of rows).
    `components(variables, x) -> {'f','df'}` (see `make_components`), when given, is evaluated
    on the clean and adversarial images. Returns a dict:
      'n', 'correct_clean', 'acc_clean', 'predictions_clean' [N];
      'zero_grad_count' (inputs whose cross-entropy input gradient is exactly zero; None when
        `check_gradients` is False), 'warnings' (list of str, see `sanity_warnings`);
      with an attack: 'correct_adv', 'acc_adv', 'predictions_adv' [N], 'attack' (its
        `describe()`), 'attacks' {member: {'correct', 'acc', 'cumulative_correct',
        'cumulative_acc'}, plus 'correct_half_steps' for pgd} (each member alone, and robust
        to it and every member before it), optionally 'x_adv' [N, H, W, C];
      with components: 'components_clean' and (with an attack) 'components_adv', each
        {'f': [N, C], 'df': [N, C]}.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    n = len(x)
    y_all = np.asarray(y)
    preds_clean, preds_adv, advs = [], [], []
    comps_clean, comps_adv = [], []
    zero_grad = 0 if check_gradients else None
    members = [m.name for m in attack.members()] if attack is not None else []
    fooled_by = {name: [] for name in members}
    half_fooled = []
    num_classes = _num_classes(predict, variables, np.asarray(x[:1], np.float32)) if "apgd-dlr" in members else None
    variables = parallel.replicate(variables)
    size = parallel.padded_size(batch_size)  # batch_size with one device
    host = parallel.to_host
    for b, start in enumerate(range(0, n, batch_size)):
        xb = _pad(np.asarray(x[start:start + batch_size], np.float32), size)
        yb = _pad(np.asarray(y[start:start + batch_size], np.int32), size)
        m = min(batch_size, n - start)
        valid = np.arange(size) < m
        (xb, yb), _ = parallel.shard_batch((xb, yb))
        preds_clean.append(host(_predict_labels(predict, variables, xb))[:m])
        if components is not None:
            comps_clean.append(jax.tree_util.tree_map(lambda a: host(a)[:m],
                                                      _components_jit(components, variables, xb)))
        if check_gradients:
            zero_grad += int(np.sum(host(_zero_input_grad(predict, variables, xb, yb))[:m]))
        if attack is not None:
            res = attack_batch(predict, variables, xb, yb, jax.random.fold_in(key, b), attack, valid=valid,
                               num_classes=num_classes)
            xa = res["x_adv"]
            preds_adv.append(host(_predict_labels(predict, variables, xa))[:m])
            for name in members:
                fooled_by[name].append(res["fooled_by"][name][:m])
            if "pgd_half_fooled" in res:
                half_fooled.append(res["pgd_half_fooled"][:m])
            if components is not None:
                comps_adv.append(jax.tree_util.tree_map(lambda a: host(a)[:m],
                                                        _components_jit(components, variables, xa)))
            if keep_examples:
                advs.append(host(xa)[:m])
        if progress is not None:
            progress.update(m)

    def cat_components(parts):
        return {k: np.concatenate([p[k] for p in parts]) for k in ("f", "df")}

    out = {"n": n, "predictions_clean": np.concatenate(preds_clean), "zero_grad_count": zero_grad}
    out["correct_clean"] = int(np.sum(out["predictions_clean"] == y_all))
    out["acc_clean"] = out["correct_clean"] / max(n, 1)
    if components is not None:
        out["components_clean"] = cat_components(comps_clean)
    if attack is not None:
        out["attack"] = attack.describe()
        out["predictions_adv"] = np.concatenate(preds_adv)
        out["correct_adv"] = int(np.sum(out["predictions_adv"] == y_all))
        out["acc_adv"] = out["correct_adv"] / max(n, 1)
        breakdown, survived = {}, np.ones(n, bool)
        for name in members:
            fooled = np.concatenate(fooled_by[name])
            survived &= ~fooled
            breakdown[name] = {"correct": int(np.sum(~fooled)), "acc": float(np.mean(~fooled)) if n else 0.0,
                               "cumulative_correct": int(np.sum(survived)),
                               "cumulative_acc": float(np.mean(survived)) if n else 0.0}
        if half_fooled:
            breakdown["pgd"]["correct_half_steps"] = int(np.sum(~np.concatenate(half_fooled)))
        out["attacks"] = breakdown
        if components is not None:
            out["components_adv"] = cat_components(comps_adv)
        if keep_examples:
            out["x_adv"] = np.concatenate(advs)
    out["warnings"] = sanity_warnings(out, attack)
    return out
