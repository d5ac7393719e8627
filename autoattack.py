"""The AutoAttack members that `attacks` runs (`--attack apgd-ce|apgd-dlr|fab-t|square`, and
the `ensemble`), each a function of `predict(variables, x) -> logits` (see `attacks.make_predict`):

- `apgd`: Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
  of diverse parameter-free attacks", ICML 2020) on the cross-entropy (`apgd-ce`) or the targeted
  DLR loss (`apgd-dlr`, the paper's APGD-T).
- `fab_t` (and `fab_min_norm`): targeted FAB (Croce & Hein, "Minimally distorted adversarial
  examples with a fast adaptive boundary attack", ICML 2020), a minimum-norm attack that walks to
  the linearised decision boundary.
- `square`: the Square Attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
  query-efficient black-box adversarial attack via random search", ECCV 2020), a random search
  that only reads the logits (the margin).

They share the geometry, losses and loops of `attacks` (how the jitted steps are looped: its
module doc), which this module imports; `attacks` imports this one only inside the function that
runs a member (`attacks._run_member`), so there is no import cycle.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import attacks
import parallel

APGD_MOMENTUM = 0.75   # alpha of Croce & Hein (2020), eq. (2)
APGD_RHO = 0.75        # rho of condition 1: fraction of steps that must raise the loss
# Square's p halves after these iterations (AutoAttack's schedule, not rescaled to the budget)
SQUARE_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
SQUARE_CHECK_EVERY = 100   # Square stops early once every example is fooled (checked this often)


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


class ApgdState(NamedTuple):
    """APGD's loop state; every field has a leading batch axis N."""
    x_cur: jax.Array      # [N, ...] current iterate x_k
    x_prev: jax.Array     # [N, ...] previous iterate x_{k-1}, for the momentum term
    g_cur: jax.Array      # [N, ...] loss gradient at x_cur
    l_cur: jax.Array      # [N] loss at x_cur
    x_best: jax.Array     # [N, ...] iterate of highest loss so far (restart point after a halving)
    g_best: jax.Array     # [N, ...] loss gradient at x_best
    l_best: jax.Array     # [N] highest loss so far
    eta: jax.Array        # [N] step size, starts at 2 eps, halved at checkpoints
    n_up: jax.Array       # [N] int32: steps since the last checkpoint that raised the loss (condition 1)
    l_best_ck: jax.Array  # [N] l_best at the last checkpoint (condition 2)
    halved_ck: jax.Array  # [N] bool: the step was halved at the last checkpoint (condition 2)
    x_out: jax.Array      # [N, ...] first misclassified point found (the clean image if it is one)
    fooled: jax.Array     # [N] bool: x_out is misclassified


@functools.partial(jax.jit, static_argnames=("predict", "norm", "loss"))
def _apgd_init(predict, variables, x, y, key, eps, target_rank, *, norm, loss):
    """(target [N], initial ApgdState) of APGD."""
    logits_clean = predict(variables, x)
    target = attacks._target_class(logits_clean, y, target_rank)
    x0 = attacks.random_start(key, x, eps, norm)
    l0, logits0, g0 = attacks._loss_and_grad(predict, variables, x0, y, target, loss)
    fooled_clean = jnp.argmax(logits_clean, -1) != y
    fooled0 = jnp.argmax(logits0, -1) != y
    n = x.shape[0]
    return target, ApgdState(
        x_cur=x0, x_prev=x0, g_cur=g0, l_cur=l0, x_best=x0, g_best=g0, l_best=l0,
        eta=jnp.full((n,), 2.0 * eps, jnp.float32), n_up=jnp.zeros(n, jnp.int32), l_best_ck=l0,
        halved_ck=jnp.zeros(n, bool),
        x_out=attacks._where(fooled_clean, x, attacks._where(fooled0, x0, x)),   # first misclassified point found
        fooled=fooled_clean | fooled0)


def _apgd_step(i, s: ApgdState, variables, x, y, target, eps, is_check, window, *, predict, norm, loss):
    """One APGD iteration i (0-based): the ApgdState after it."""
    a = jnp.where(i == 0, 1.0, APGD_MOMENTUM)
    step = attacks._bcast(s.eta, s.x_cur) * attacks._ascent_direction(s.g_cur, norm)
    z = attacks.project(s.x_cur + step, x, eps, norm)
    x_new = attacks.project(s.x_cur + a * (z - s.x_cur) + (1.0 - a) * (s.x_cur - s.x_prev), x, eps, norm)
    l_new, logits, g_new = attacks._loss_and_grad(predict, variables, x_new, y, target, loss)

    hit = (jnp.argmax(logits, -1) != y) & ~s.fooled   # keep the first misclassified point
    better = l_new > s.l_best                          # keep the point of highest loss
    x_best, g_best = attacks._where(better, x_new, s.x_best), attacks._where(better, g_new, s.g_best)
    l_best = jnp.where(better, l_new, s.l_best)
    n_up = s.n_up + (l_new > s.l_cur)

    # Checkpoint w_j: halve the step where one of the two conditions holds, and restart
    # those examples from their best point (with no momentum).
    ck = is_check[i]
    cond1 = n_up < APGD_RHO * window[i]
    cond2 = ~s.halved_ck & (s.l_best_ck >= l_best)
    halve = ck & (cond1 | cond2)
    return ApgdState(
        x_cur=attacks._where(halve, x_best, x_new), x_prev=attacks._where(halve, x_best, s.x_cur),
        g_cur=attacks._where(halve, g_best, g_new), l_cur=jnp.where(halve, l_best, l_new),
        x_best=x_best, g_best=g_best, l_best=l_best,
        eta=jnp.where(halve, 0.5 * s.eta, s.eta), n_up=jnp.where(ck, 0, n_up),
        l_best_ck=jnp.where(ck, l_best, s.l_best_ck), halved_ck=jnp.where(ck, halve, s.halved_ck),
        x_out=attacks._where(hit, x_new, s.x_out), fooled=s.fooled | hit)


_APGD_STATIC = ("predict", "norm", "loss")
_apgd_step_jit = jax.jit(_apgd_step, static_argnames=_APGD_STATIC)
_apgd_fori = attacks._fori(_apgd_step, _APGD_STATIC)


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
    s = attacks._iterate(_apgd_step_jit, _apgd_fori, 0, steps, init, variables, x, y, target, eps, is_check, window,
                         predict=predict, norm=norm, loss=loss)
    return attacks._where(s.fooled, s.x_out, s.x_best)


# --------------------------------------------------------------------------------------
# FAB-T (Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive
# boundary attack", ICML 2020)
# --------------------------------------------------------------------------------------
FAB_BISECTIONS = 40   # halvings of the bracket of the projection's multiplier (float32 needs ~24)


def project_onto_hyperplane_box(p, w, b, norm):
    """The smallest step d [N, ...] (in the L-inf or L2 norm) with w.(p + d) = b and p + d in
    [0, 1], per example; p, w [N, ...], b [N]. Where no point of the box reaches the hyperplane,
    the box corner that comes closest (every coordinate moved as far as it helps).

    Flip the sign so that w.d must grow by r >= 0. Coordinate i can move by up to `room_i` in
    the direction of sign(w_i). The L-inf optimum moves every coordinate by min(lam, room_i), the
    L2 optimum by min(lam |w_i|, room_i) (the KKT conditions of the box-constrained least-norm
    problem); in both, w.d = F(lam) = sum_i a_i min(lam, beta_i) is piecewise linear and
    increasing (L-inf: a = |w|, beta = room; L2: a = w^2, beta = room / |w|). Bisection brackets
    lam between breakpoints, then lam solves the linear piece exactly. (Sorting the breakpoints
    instead costs more than the network's step on XLA:CPU at CIFAR size.)"""
    shape = p.shape
    n = shape[0]
    p, w = p.reshape(n, -1), w.reshape(n, -1)
    r = b - jnp.sum(w * p, axis=1)
    w = w * jnp.where(r < 0, -1.0, 1.0)[:, None]
    r = jnp.abs(r)
    aw = jnp.abs(w)
    room = jnp.where(w > 0, 1.0 - p, p)
    if norm == "linf":
        a, beta = aw, room
    else:
        a, beta = aw ** 2, room / jnp.where(aw > 0, aw, 1.0)
    beta = jnp.where(aw > 0, beta, 0.0)           # coordinates that cannot help saturate at once

    def below(lam):   # F(lam) < r
        return jnp.sum(a * jnp.minimum(lam[:, None], beta), axis=1) < r

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        low = below(mid)
        return jnp.where(low, mid, lo), jnp.where(low, hi, mid)
    beta_max = jnp.max(beta, axis=1)
    lo, hi = jax.lax.fori_loop(0, FAB_BISECTIONS, halve, (jnp.zeros_like(r), beta_max))
    saturated = beta <= lo[:, None]
    free = jnp.sum(jnp.where(saturated, 0.0, a), axis=1)
    lam = (r - jnp.sum(jnp.where(saturated, a * beta, 0.0), axis=1)) / jnp.where(free > 0, free, 1.0)
    lam = jnp.clip(lam, lo, hi)
    reachable = ~below(beta_max)
    lam = jnp.where(reachable, lam, jnp.inf)[:, None]
    move = jnp.minimum(lam, room) if norm == "linf" else jnp.minimum(lam * aw, room)
    d = jnp.where(aw > 0, jnp.sign(w) * move, 0.0)
    return d.reshape(shape)


def _lp_norm(v, norm):
    """[N] L-inf or L2 norm of each example of v [N, ...]."""
    flat = v.reshape(v.shape[0], -1)
    return jnp.max(jnp.abs(flat), 1) if norm == "linf" else jnp.sqrt(jnp.sum(flat ** 2, 1))


class FabState(NamedTuple):
    """FAB's loop state; every field has a leading batch axis N."""
    x_cur: jax.Array   # [N, ...] current iterate
    x_best: jax.Array  # [N, ...] misclassified point closest to x found so far (x where none)
    dist: jax.Array    # [N] its distance to x in the attack's norm (inf where none; 0 for clean mistakes)


@functools.partial(jax.jit, static_argnames=("predict", "norm"))
def _fab_init(predict, variables, x, y, key, eps, target_rank, start, *, norm):
    """(target [N], initial FabState). `start` (traced bool): a random start at radius eps / 2,
    else the clean image itself (AutoAttack's first run)."""
    logits = predict(variables, x)
    target = attacks._target_class(logits, y, target_rank)
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        t = t / attacks._bcast(jnp.maximum(_lp_norm(t, "linf"), 1e-12), t)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        t = t / attacks._per_example_norm(t)
    x_cur = jnp.where(start, jnp.clip(x + 0.5 * eps * t, 0.0, 1.0), x)
    fooled = jnp.argmax(logits, -1) != y
    return target, FabState(x_cur=x_cur, x_best=x, dist=jnp.where(fooled, 0.0, jnp.inf))


def _fab_step(i, s: FabState, variables, x, y, target, *, predict, norm):
    """One FAB iteration: linearise z_target - z_y at the iterate, project both the iterate and x
    onto that boundary (inside [0, 1]), step to a mix of the two projections that leans towards x
    by alpha, overshooting by attacks.FAB_ETA; a misclassified result that beats the best is kept, and
    the iterate then steps back towards x by attacks.FAB_BETA."""
    del i

    def diff(x_):
        logits = predict(variables, x_)
        d = jnp.take_along_axis(logits, target[:, None], 1)[:, 0] - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
        return jnp.sum(d), d
    g, df = jax.grad(diff, has_aux=True)(s.x_cur)
    b = jnp.sum((g * s.x_cur).reshape(g.shape[0], -1), 1) - df   # boundary: g.z = b (df + g.(z - x_cur) = 0)
    d_cur = project_onto_hyperplane_box(s.x_cur, g, b, norm)
    d_orig = project_onto_hyperplane_box(x, g, b, norm)
    n_cur = jnp.maximum(_lp_norm(d_cur, norm), 1e-8)
    n_orig = jnp.maximum(_lp_norm(d_orig, norm), 1e-8)
    alpha = attacks._bcast(jnp.clip(n_cur / (n_cur + n_orig), 0.0, attacks.FAB_ALPHA_MAX), x)
    eta = attacks.FAB_ETA
    x_new = jnp.clip((s.x_cur + eta * d_cur) * (1 - alpha) + (x + eta * d_orig) * alpha, 0.0, 1.0)
    adv = jnp.argmax(predict(variables, x_new), -1) != y
    dist = _lp_norm(x_new - x, norm)
    better = adv & (dist < s.dist)
    return FabState(x_cur=attacks._where(adv, x + (x_new - x) * attacks.FAB_BETA, x_new),
                    x_best=attacks._where(better, x_new, s.x_best), dist=jnp.where(better, dist, s.dist))


_FAB_STATIC = ("predict", "norm")
_fab_step_jit = jax.jit(_fab_step, static_argnames=_FAB_STATIC)
_fab_fori = attacks._fori(_fab_step, _FAB_STATIC)


def fab_min_norm(predict, variables, x, y, key, eps, *, steps=100, norm="linf", target_rank=0,
                 random_start=False):
    """Targeted FAB (Croce & Hein, ICML 2020b, as in AutoAttack's FAB-T): the smallest
    misclassified point it finds on the way to the boundary between y and the class of rank
    `target_rank` (0 = highest) among the other classes of the clean logits.

    From x (or, with `random_start`, from a random point at radius eps / 2: AutoAttack's later
    restarts), `steps` iterations of `_fab_step`. Returns (x_best [N, ...], dist [N]): the
    misclassified point closest to x in the `norm` found, and that distance; dist is inf where
    none was found (x_best = x there) and 0 where x itself is misclassified. Points lie in
    [0, 1]; they are not bounded by eps."""
    x = jnp.asarray(x, jnp.float32)
    target, init = _fab_init(predict, variables, x, y, key, eps, target_rank, bool(random_start), norm=norm)
    s = attacks._iterate(_fab_step_jit, _fab_fori, 0, steps, init, variables, x, y, target, predict=predict,
                         norm=norm)
    return s.x_best, s.dist


def fab_t(predict, variables, x, y, key, eps, *, steps=100, norm="linf", target_rank=0, random_start=False):
    """FAB-T as an eps-bounded attack: per example the point of `fab_min_norm` where it lies
    within eps of x, else x itself. Inside the eps-ball and [0, 1]."""
    x = jnp.asarray(x, jnp.float32)
    x_best, dist = fab_min_norm(predict, variables, x, y, key, eps, steps=steps, norm=norm,
                                target_rank=target_rank, random_start=random_start)
    return attacks._where(dist <= eps, x_best, x)


# --------------------------------------------------------------------------------------
# Square (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
# black-box adversarial attack via random search", ECCV 2020)
# --------------------------------------------------------------------------------------
def margin_per_example(logits, y):
    """[N] z_y - max_{j != y} z_j of logits [N, C]: negative where the example is misclassified."""
    z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    z_other = jnp.max(jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), axis=1)
    return z_y - z_other


def square_sizes(p_init, height, width, norm):
    """[len(SQUARE_SCHEDULE) + 1] int32: Square's side length s at each level of the schedule,
    s = round(sqrt(p * H * W)) with p = p_init / 2**level (at least 1 for L-inf; for L2 at least
    3 and odd), capped at the image side."""
    sizes = []
    for level in range(len(SQUARE_SCHEDULE) + 1):
        s = int(round(np.sqrt(p_init / 2 ** level * height * width)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2
        sizes.append(min(s, height, width))
    return np.asarray(sizes, np.int32)


def _square_size(i, sizes):
    """Side length at iteration i: p halves after each iteration in SQUARE_SCHEDULE."""
    level = jnp.sum(i > jnp.asarray(SQUARE_SCHEDULE))
    return sizes[level]


def _window(top, left, s, height, width):
    """[N, H, W, 1] bool: the s x s square at (top [N], left [N]) of each example."""
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    t, l_ = top[:, None, None], left[:, None, None]
    return ((rows >= t) & (rows < t + s) & (cols >= l_) & (cols < l_ + s))[..., None]


def _l2_pattern(top, left, s, flip, height, width):
    """[N, H, W, 1]: Square's L2 update pattern eta(s) placed at (top, left), zero elsewhere, of
    unit L2 norm per example. eta(s) stacks two halves, +R(s // 2, s) over -R(s - s // 2, s), each
    of unit norm, transposed where `flip`. R(a, b) is a sum of concentric rectangles around
    (a // 2, b // 2), the k-th (k = 0, 1, ...; k steps out in each direction) weighted
    1 / (k + 1)^2: R[i, j] = sum over k from max(|i - a // 2|, |j - b // 2|) to b // 2 of
    1 / (k + 1)^2. All sizes may be traced."""
    n = top.shape[0]
    i = jnp.broadcast_to(jnp.arange(height)[None, :, None] - top[:, None, None], (n, height, width))
    j = jnp.broadcast_to(jnp.arange(width)[None, None, :] - left[:, None, None], (n, height, width))
    fl = flip[:, None, None]
    i, j = jnp.where(fl, j, i), jnp.where(fl, i, j)
    inside = (i >= 0) & (i < s) & (j >= 0) & (j < s)
    half = s // 2
    upper = i < half
    a = jnp.where(upper, half, s - half)
    ii = jnp.where(upper, i, i - half)
    ring = jnp.maximum(jnp.abs(ii - a // 2), jnp.abs(j - s // 2))
    # tail[k] = sum_{m >= k} 1 / (m + 1)^2 up to the outermost ring s // 2
    inv_sq = 1.0 / (np.arange(1, max(height, width) + 2, dtype=np.float64) ** 2)
    cum = jnp.asarray(np.concatenate([[0.0], np.cumsum(inv_sq)]), jnp.float32)
    value = cum[s // 2 + 1] - cum[jnp.clip(ring, 0, s // 2 + 1)]
    e = jnp.where(inside, jnp.where(upper, value, -value), 0.0)

    def half_norm(mask):
        return jnp.sqrt(jnp.sum(jnp.where(mask, e ** 2, 0.0), axis=(1, 2), keepdims=True))
    e = e / jnp.maximum(jnp.where(upper, half_norm(upper & inside), half_norm(~upper & inside)), 1e-12)
    e = e / jnp.maximum(jnp.sqrt(jnp.sum(e ** 2, axis=(1, 2), keepdims=True)), 1e-12)
    return e[..., None]


def _random_signs(key, shape):
    return jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)


def _square_init_delta(key, x, norm):
    """Square's first perturbation direction: L-inf, vertical stripes of random sign (per
    column and channel); L2, a grid of s0 x s0 tiles (s0 = H // 5) each holding eta(s0),
    transposed at random and with random signs per channel (per example, tile and channel),
    normalised to unit L2 norm."""
    n, h, w, c = x.shape
    if norm == "linf":
        return _random_signs(key, (n, 1, w, c))
    s0 = max(h // 5, 1)
    start = (h - 5 * s0) // 2
    tops = [start + k * s0 for k in range(h // s0) if start + k * s0 < h]
    lefts = [start + k * s0 for k in range(w // s0) if start + k * s0 < w]
    # Static maps: the tile of each pixel (-1 outside the grid) and the pixel's place in it.
    tile = -np.ones((h, w), np.int32)
    rel = np.zeros((h, w), np.int32)
    for t, (r, c_) in enumerate((r, c_) for r in tops for c_ in lefts):
        rr, cc = np.meshgrid(np.arange(r, min(r + s0, h)), np.arange(c_, min(c_ + s0, w)), indexing="ij")
        tile[rr, cc] = t
        rel[rr, cc] = (rr - r) * s0 + (cc - c_)
    with jax.ensure_compile_time_eval():
        eta = np.asarray(_l2_pattern(jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), s0,
                                     jnp.asarray([False, True]), s0, s0))[..., 0].reshape(2, -1)   # [2, s0*s0]
    n_tiles = len(tops) * len(lefts)
    k_flip, k_sign = jax.random.split(key)
    flip = jax.random.bernoulli(k_flip, 0.5, (n, n_tiles))
    signs = _random_signs(k_sign, (n, n_tiles, c))
    inside = tile >= 0
    t_idx = np.where(inside, tile, 0)
    pattern = jnp.where(flip[:, t_idx], eta[1][rel], eta[0][rel])          # [N, H, W]
    delta = jnp.where(inside[None, :, :, None], pattern[..., None] * signs[:, t_idx], 0.0)
    return delta / attacks._per_example_norm(delta)


class SquareState(NamedTuple):
    """Square's loop state; every field has a leading batch axis N."""
    x_best: jax.Array  # [N, ...] point of lowest margin found (the clean image for clean mistakes)
    margin: jax.Array  # [N] margin at x_best; <= 0: fooled, and that example stops moving


@functools.partial(jax.jit, static_argnames=("predict", "norm"))
def _square_init(predict, variables, x, y, key, eps, *, norm):
    """The first query: x plus eps times the initial direction, clipped to [0, 1]; examples
    misclassified when clean keep the clean image."""
    margin_clean = margin_per_example(predict(variables, x), y)
    x0 = jnp.clip(x + eps * _square_init_delta(key, x, norm), 0.0, 1.0)
    margin0 = margin_per_example(predict(variables, x0), y)
    fooled_clean = margin_clean <= 0
    return SquareState(x_best=attacks._where(fooled_clean, x, x0),
                       margin=jnp.where(fooled_clean, margin_clean, margin0))


def _square_proposal_linf(key, x, x_best, eps, s):
    """Set one random s x s square per example to x +- eps (one sign per channel)."""
    n, h, w, c = x.shape
    kt, kl, ks = jax.random.split(key, 3)
    top = jax.random.randint(kt, (n,), 0, h - s + 1)
    left = jax.random.randint(kl, (n,), 0, w - s + 1)
    x_new = jnp.where(_window(top, left, s, h, w), x + eps * _random_signs(ks, (n, 1, 1, c)), x_best)
    return jnp.clip(x_new, 0.0, 1.0)


def _square_proposal_l2(key, x, x_best, eps, s):
    """Move the perturbation's mass from one random s x s square (emptied) to another (the
    pattern eta(s) with random signs per channel, plus the square's old content), keeping the
    total norm at eps."""
    n, h, w, c = x.shape
    kt, kl, kt2, kl2, kf, ks = jax.random.split(key, 6)
    top, left = jax.random.randint(kt, (n,), 0, h - s + 1), jax.random.randint(kl, (n,), 0, w - s + 1)
    top2, left2 = jax.random.randint(kt2, (n,), 0, h - s + 1), jax.random.randint(kl2, (n,), 0, w - s + 1)
    win1 = _window(top, left, s, h, w).astype(x.dtype)
    win2 = _window(top2, left2, s, h, w).astype(x.dtype)
    delta = x_best - x
    norm_win1 = jnp.sqrt(jnp.sum((delta * win1) ** 2, axis=(1, 2), keepdims=True))   # [N, 1, 1, C]
    norm_all = attacks._per_example_norm(delta)                                                 # [N, 1, 1, 1]
    norm_wins = attacks._per_example_norm(delta * jnp.maximum(win1, win2))
    pattern = _l2_pattern(top, left, s, jax.random.bernoulli(kf, 0.5, (n,)), h, w)
    new = pattern * _random_signs(ks, (n, 1, 1, c)) + delta * win1 / (1e-12 + norm_win1)
    new = new / (1e-12 + jnp.sqrt(jnp.sum(new ** 2, axis=(1, 2), keepdims=True)))
    new = new * jnp.sqrt(jnp.maximum(eps ** 2 - norm_all ** 2, 0.0) / c + norm_wins ** 2)
    delta = delta * (1 - win2)
    delta = delta * (1 - win1) + new * win1
    return jnp.clip(x + eps * delta / attacks._per_example_norm(delta), 0.0, 1.0)


def _square_step(i, s: SquareState, variables, x, y, key, eps, sizes, *, predict, norm):
    """One query: a random square proposal per example still correctly classified, kept where
    it lowers the margin."""
    size = _square_size(i, sizes)
    k = jax.random.fold_in(key, i)
    if norm == "linf":
        x_new = _square_proposal_linf(k, x, s.x_best, eps, size)
    else:
        x_new = _square_proposal_l2(k, x, s.x_best, eps, size)
    margin = margin_per_example(predict(variables, x_new), y)
    better = (s.margin > 0) & (margin < s.margin)
    return SquareState(x_best=attacks._where(better, x_new, s.x_best), margin=jnp.where(better, margin, s.margin))


_SQUARE_STATIC = ("predict", "norm")
_square_step_jit = jax.jit(_square_step, static_argnames=_SQUARE_STATIC)
_square_fori = attacks._fori(_square_step, _SQUARE_STATIC)


def square(predict, variables, x, y, key, eps, *, queries=5000, norm="linf", p_init=0.8, valid=None):
    """The Square Attack (Andriushchenko et al., ECCV 2020) on the margin z_y - max_{j!=y} z_j,
    as in AutoAttack (its schedule for p, not rescaled to `queries`).

    A random search that reads only the logits. From an initial query (L-inf: x + eps * vertical
    stripes of random sign; L2: a grid of random patterns of norm eps), each of `queries`
    iterations proposes, per example still correctly classified, a change of one random square of
    side s = round(sqrt(p * H * W)) (L-inf: the square's pixels set to x +- eps, one sign per
    channel; L2: perturbation mass moved from one square into another, total norm eps) and keeps
    it if it lowers the margin. p starts at `p_init` and halves on AutoAttack's schedule
    (SQUARE_SCHEDULE). The squares are drawn per example, from `key` folded with the iteration.
    Stops early once every example (every row marked in `valid` [N] bool) is misclassified,
    checking every SQUARE_CHECK_EVERY queries (not inside an outer jax.jit).

    Returns x_adv [N, ...]: the point of lowest margin found (misclassified where the attack
    succeeded; the clean image where it is misclassified), inside the eps-ball and [0, 1].
    """
    x = jnp.asarray(x, jnp.float32)
    n, h, w, _ = x.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    sizes = jnp.asarray(square_sizes(p_init, h, w, norm))
    k_init, k_steps = jax.random.split(key)
    state = _square_init(predict, variables, x, y, k_init, eps, norm=norm)
    traced = isinstance(state.margin, jax.core.Tracer)   # inside an outer jit: no early stop
    for lo in range(0, queries, SQUARE_CHECK_EVERY):
        if not traced and np.all(parallel.to_host(state.margin)[valid] <= 0):
            break
        hi = min(lo + SQUARE_CHECK_EVERY, queries)
        state = attacks._iterate(_square_step_jit, _square_fori, lo, hi, state, variables, x, y, k_steps, eps, sizes,
                                 predict=predict, norm=norm)
    return state.x_best
