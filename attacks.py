"""Adversarial attacks and evaluation under attack.

Every attack takes a `predict(variables, x) -> logits` function, built once per dynamics
(see `make_predict`), so the same code attacks standard, linearized and centered models.
BatchNorm always runs in inference mode here, and the state returned by the network is
discarded, so an attack can never move the running statistics.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from models import dynamics_apply


def make_predict(apply, dynamics):
    """`predict(variables, x) -> logits [N, C]` for variables = (theta, theta0, net_state),
    with BatchNorm in inference mode."""
    def predict(variables, x):
        theta, theta0, net_state = variables
        return dynamics_apply(apply, dynamics, theta, theta0, net_state, x, is_training=False)[0]
    return predict


@dataclass(frozen=True)
class AttackConfig:
    """One attack: its norm, radius, step size, number of steps and restarts."""
    norm: str = "linf"        # 'linf' or 'l2'
    eps: float = 4 / 255
    step_size: float = 2 * 4 / 255 / 100
    steps: int = 100
    name: str = "pgd"
    restarts: int = 1

    def describe(self):
        return {"attack": self.name, "norm": self.norm, "eps": self.eps, "step_size": self.step_size,
                "steps": self.steps, "restarts": self.restarts}


def linf_config(eps, steps, **kw):
    """The reference's L-inf PGD: step 2*eps/steps."""
    return AttackConfig(norm="linf", eps=eps, step_size=2 * eps / steps, steps=steps, **kw)


def l2_config(steps, eps=0.25, step_size=0.01, **kw):
    """The reference's L2 PGD: eps 0.25, step 0.01."""
    return AttackConfig(norm="l2", eps=eps, step_size=step_size, steps=steps, **kw)


def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) + 1e-12).reshape((-1,) + (1,) * (v.ndim - 1))


def project(x_adv, x0, eps, norm):
    """Clip to [0, 1], then project x_adv - x0 back onto the eps-ball. Because x0 is in
    [0, 1] the projection (a shrink towards x0) keeps the point in [0, 1]."""
    x_adv = jnp.clip(x_adv, 0.0, 1.0)
    delta = x_adv - x0
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / _per_example_norm(delta))
    return x0 + delta


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


def _xent_sum(predict, variables, x, y):
    logits = predict(variables, x)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))


@functools.partial(jax.jit, static_argnames=("predict", "norm", "steps"))
def pgd(predict, variables, x, y, key, eps, step_size, *, steps, norm="linf"):
    """Projected gradient descent on the cross-entropy (Madry et al., ICLR 2018).

    One seeded random start, then `steps` steps of
      L-inf: x <- x + step_size * sign(grad);   L2: x <- x + step_size * grad / ||grad||,
    each followed by a clip to [0, 1] and a projection onto the eps-ball around x.
    Runs inside jit with `lax.fori_loop`. Returns adversarial images, same shape as x.
    """
    grad_fn = jax.grad(_xent_sum, argnums=2)
    x = x.astype(jnp.float32)

    def body(_, x_adv):
        g = grad_fn(predict, variables, x_adv, y)
        if norm == "linf":
            x_adv = x_adv + step_size * jnp.sign(g)
        else:
            x_adv = x_adv + step_size * g / _per_example_norm(g)
        return project(x_adv, x, eps, norm)  # clip to [0,1], then back into the ball

    x_adv = random_start(key, x, eps, norm)
    return jax.lax.fori_loop(0, steps, body, x_adv)


def run_attack(predict, variables, x, y, key, cfg: AttackConfig):
    """Adversarial examples for one batch under `cfg`. With restarts, an example keeps the
    first restart that fools the model (it counts as robust only if it survives all)."""
    best = None
    for r in range(cfg.restarts):
        k = jax.random.fold_in(key, r)
        x_adv = pgd(predict, variables, x, y, k, cfg.eps, cfg.step_size, steps=cfg.steps, norm=cfg.norm)
        if best is None:
            best = x_adv
        else:
            still_correct = jnp.argmax(predict(variables, best), -1) == y
            best = jnp.where(still_correct.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, best)
    return best


@functools.partial(jax.jit, static_argnames=("predict",))
def _predict_labels(predict, variables, x):
    return jnp.argmax(predict(variables, x), -1)


def _pad(a, size):
    if len(a) == size:
        return a
    pad = np.zeros((size - len(a),) + a.shape[1:], a.dtype)
    return np.concatenate([a, pad])


def evaluate(predict, variables, x, y, *, batch_size=100, attack: AttackConfig | None = None,
             key=None, keep_examples=False, progress=None):
    """Clean (and, with `attack`, robust) accuracy over arrays, in order, in batches.

    The last partial batch is padded to `batch_size` (so nothing recompiles) and only its real
    rows are counted. Returns a dict: 'n', 'correct_clean', 'acc_clean', 'predictions_clean'
    and, with an attack, 'correct_adv', 'acc_adv', 'predictions_adv' and optionally
    'x_adv' [N, H, W, C].
    """
    key = jax.random.PRNGKey(0) if key is None else key
    n = len(x)
    preds_clean, preds_adv, advs = [], [], []
    for b, start in enumerate(range(0, n, batch_size)):
        xb = _pad(np.asarray(x[start:start + batch_size], np.float32), batch_size)
        yb = _pad(np.asarray(y[start:start + batch_size], np.int32), batch_size)
        m = min(batch_size, n - start)
        preds_clean.append(np.asarray(_predict_labels(predict, variables, xb))[:m])
        if attack is not None:
            xa = run_attack(predict, variables, jnp.asarray(xb), jnp.asarray(yb),
                            jax.random.fold_in(key, b), attack)
            preds_adv.append(np.asarray(_predict_labels(predict, variables, xa))[:m])
            if keep_examples:
                advs.append(np.asarray(xa)[:m])
        if progress is not None:
            progress.update(m)
    y = np.asarray(y)
    out = {"n": n, "predictions_clean": np.concatenate(preds_clean)}
    out["correct_clean"] = int(np.sum(out["predictions_clean"] == y))
    out["acc_clean"] = out["correct_clean"] / max(n, 1)
    if attack is not None:
        out["predictions_adv"] = np.concatenate(preds_adv)
        out["correct_adv"] = int(np.sum(out["predictions_adv"] == y))
        out["acc_adv"] = out["correct_adv"] / max(n, 1)
        if keep_examples:
            out["x_adv"] = np.concatenate(advs)
    return out
