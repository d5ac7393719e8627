"""Tangent features of a network and the images that align them with a parameter direction:
the NTK eigen-images of visualize_ntk_features.py.

The tangent feature of an image x for logit c is g = grad_theta f_c(x); the empirical NTK is
K[i, j] = <g(x_i), g(x_j)> (ntk.py). For an eigenvector u of K over the images X, or the
kernel-regression weights w = K^-1 y_c, the parameter-space direction is
v = sum_j u[j] grad_theta f_c(x_j), one vjp over the batch (`TangentTools.direction`). An image
whose tangent feature lines up with v is found by signed steps on the cosine,

    x <- clip(x + step_size * sign(grad_x cos(grad_theta f_c(x), v)), 0, 1)

(ascent; descent with the opposite sign), keeping the iterate with the best cosine: on a ReLU
network a fixed-size signed step can overshoot a kink, so the last one may be worse.
`eigen_images` draws, from a mid-grey start, the ascent and descent images of the top
eigenvectors and the ascent image of the regression weights.

Each step costs one reverse-over-reverse pass: a vjp in theta gives g, from which <g, v> and
||g|| both follow, and its gradient in x is one more backward pass. No per-pixel gradients or
Jacobians are formed. The loop runs as one jitted `lax.fori_loop`, or as a host loop over the
jitted step (`attacks.loop_mode`: XLA:CPU runs weight-gradient convolutions several times slower
inside while loops).

Several classes (the mean kernel over the C logits): the tangent feature of x is the stacked
(grad f_1(x), ..., grad f_C(x)), whose inner products give exactly C times the mean kernel (the
factor cancels in a cosine); v is stacked the same way, v_c = sum_j coef[j, c] grad f_c(x_j).
This costs C times the single-class work.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attacks

_CHUNK = 32  # images per vjp when forming v (bounds the memory of the backward pass)


def _tree_vdot(a, b):
    """<a, b> summed over the leaves of two trees of the same structure."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _stacked_pullback(pullback, cotangent, k):
    """Apply a vjp `pullback` of an output [..., k] once per column: returns a tree with a leading
    axis k whose entry c is the pullback of the cotangent masked to column c."""
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

    return TangentTools(direction, jax.jit(cosine), _ascender(cosine, loop), classes, loop)


def _ascender(cosine, loop):
    """ascend(params, v, x0, sign, step_size, steps) -> (x_best, cos_best, history) on
    `cosine(params, v, x)`: see make_tangent_fns. `loop` is 'fori' or 'host'."""
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

    return ascend_fori if loop == "fori" else ascend_host


def make_kernel_tools(kernel_fn, k_train, classes, loop="auto", get="ntk"):
    """TangentTools for an infinite-width kernel, which has no parameters: the cosine of the
    (infinite) tangent feature of x with v = sum_j coef[j] g(x_j) is computed through the kernel,

        cos = K(x,X) coef / sqrt(K(x,x) coef^T K coef)   (= K(x,X) u / sqrt(K(x,x) lambda) for an eigenvector),

    which is what `make_tangent_fns`'s cosine is for an empirical kernel. With k stacked classes
    (the mean kernel; every logit of an infinite network has the same kernel K):
    sum_c K(x,X) coef_c / sqrt(k K(x,x) sum_c coef_c^T K coef_c). `params` is X [n, H, W, C] itself,
    v is (coef [n, k], sum_c coef_c^T K coef_c); `kernel_fn` is infinite.Network.kernel_fn, `get`
    which of its kernels ('ntk' or 'nngp'), and k_train [n, n] that kernel's K(X, X)."""
    classes = tuple(int(c) for c in classes)
    k = len(classes)
    loop = attacks.loop_mode(loop)
    gram = jnp.asarray(k_train, jnp.float32)

    def direction(x_ref, x, coef):
        coef = jnp.asarray(np.asarray(coef, np.float32).reshape(len(x), k))
        return coef, jnp.sum(coef * (gram @ coef))

    def cosine(x_ref, v, x):
        coef, v_sq = v
        k_x = kernel_fn(x[None], x_ref, get=get)[0]      # K(x, X) [n]
        k_xx = kernel_fn(x[None], get=get)[0, 0]         # K(x, x)
        return jnp.sum(k_x @ coef) / (jnp.sqrt(k * k_xx * v_sq) + 1e-30)

    return TangentTools(direction, jax.jit(cosine), _ascender(cosine, loop), classes, loop)


def eigen_images(tools, params, x_kernel, evecs, w, n_images, steps, step_size, progress=True):
    """From a mid-grey start (0.5), the ascent ('pos') and descent ('neg') images of the top
    `n_images` eigenvectors evecs[:, i] of the kernel over x_kernel [n, H, W, C], and the ascent
    image of the regression weights w [n, k] ('w'), `steps` signed steps of `step_size` each.
    Returns ({'pos_images', 'neg_images', 'pos_cos', 'neg_cos', 'pos_cos_history',
    'neg_cos_history', 'w_image', 'w_cos', 'w_cos_history'}, seconds)."""
    m, k, n = n_images, len(tools.classes), len(x_kernel)
    image_shape = x_kernel.shape[1:]
    x0 = jnp.full(image_shape, 0.5, jnp.float32)
    out = {f"{kind}_{what}": np.zeros(shape, np.float64 if what == "cos" else np.float32) for kind in ("pos", "neg")
           for what, shape in (("images", (m,) + image_shape), ("cos", (m,)), ("cos_history", (m, steps + 1)))}
    jobs = [("pos", i) for i in range(m)] + [("neg", i) for i in range(m)] + [("w", 0)]
    directions = {}
    t0 = time.perf_counter()
    for kind, i in tqdm(jobs, desc="eigen-images", disable=None if progress else True):
        if kind == "w":
            v = tools.direction(params, x_kernel, w.reshape(n, k))
        else:
            if i not in directions:
                directions[i] = tools.direction(params, x_kernel, np.repeat(evecs[:, i:i + 1], k, axis=1))
            v = directions.pop(i) if kind == "neg" else directions[i]
        x, c_best, history = tools.ascend(params, v, x0, -1.0 if kind == "neg" else 1.0, step_size, steps=steps)
        if kind == "w":
            out.update(w_image=np.asarray(x), w_cos=float(c_best), w_cos_history=np.asarray(history))
        else:
            out[f"{kind}_images"][i], out[f"{kind}_cos"][i] = np.asarray(x), float(c_best)
            out[f"{kind}_cos_history"][i] = np.asarray(history)
    return out, time.perf_counter() - t0
