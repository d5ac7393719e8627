"""Training: the train state, the reference's optimizer and learning-rate schedule, the loss,
and one jitted train step for any of the dynamics in models.DYNAMICS. The epochs and the two
phases of run_exp.py that take these steps are experiment.py's."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from models import dynamics_apply


class TrainState(NamedTuple):
    params: Any      # the parameters being trained (theta)
    net_state: Any   # Haiku state: BatchNorm running statistics
    opt_state: Any   # optax state of SGD with momentum; holds the current learning rate
    step: Any        # number of optimizer steps taken (int32 scalar)


def make_optimizer(lr, momentum=0.9):
    """The reference's optimizer: SGD with momentum 0.9, no Nesterov, no weight decay (momentum
    0 is plain SGD, Tsilivis & Kempe's). The learning rate and the momentum live in the state,
    so the lr can change on epoch boundaries and a step function serves any of them."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)


def set_lr(opt_state, lr):
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, dtype=jnp.float32)
    return opt_state


def get_lr(opt_state):
    return float(opt_state.hyperparams["learning_rate"])


def phase1_lr(epoch, base_lr=0.1, schedule="reference"):
    """base_lr (the reference's 0.1), x0.1 once epoch 99 has finished, x0.01 once epoch 149 has
    finished; base_lr at every epoch with schedule 'constant' (cli.LR_SCHEDULES)."""
    if schedule == "constant":
        return base_lr
    if epoch >= 150:
        return base_lr * 0.01
    if epoch >= 100:
        return base_lr * 0.1
    return base_lr


def cross_entropy(logits, labels):
    """Softmax cross-entropy of integer labels, averaged over the batch."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def make_train_step(apply, dynamics, is_training, optimizer):
    """A jitted `(TrainState, theta0, x, y) -> (TrainState, metrics)` step.

    `dynamics` is one of models.DYNAMICS; `theta0` is ignored by 'standard'. With
    `is_training`, BatchNorm uses batch statistics and its running averages are updated;
    otherwise it is frozen to them. metrics = {'loss': mean loss before the update, 'correct':
    count, 'finite': whether every float of the new TrainState is finite}.
    """
    def loss_fn(params, net_state, theta0, x, y):
        logits, new_state = dynamics_apply(apply, dynamics, params, theta0, net_state, x,
                                           is_training=is_training)
        return cross_entropy(logits, y), (logits, new_state)

    def step(state, theta0, x, y):
        (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.net_state, theta0, x, y)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if not is_training:
            new_state = state.net_state
        new = TrainState(params, new_state, opt_state, state.step + 1)
        # The loss was taken before the update: also report whether the new state is finite,
        # so a NaN guard never lets a non-finite state reach a checkpoint.
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(new)
                                    if jnp.issubdtype(a.dtype, jnp.inexact)]))
        metrics = {"loss": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == y), "finite": finite}
        return new, metrics

    return jax.jit(step)

