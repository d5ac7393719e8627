"""One experiment of run_exp.py (Loo et al. 2022): phase 1 in standard dynamics, then phase 2 in
linearized, centered or standard dynamics, each epoch clean or adversarial; the evaluation after
each phase; the checkpoints; and a resume record after every epoch, from which an interrupted run
continues exactly. train.py gives the jitted steps; run_exp.py parses and checks the flags and
guards --save_path.

An adversarial batch is, as in the reference, two optimizer steps: one on the clean batch, then
one on PGD-20 examples (L-inf radius eps, step 2 eps / 20, random start) made against the
just-updated model. Beyond the reference, the training attack's steps, step size and random
start, FGSM, and adversarial-only batches (one step, on the attack's examples) express Tsilivis
& Kempe's recipe (`train_attack`). The evaluation is clean, L-inf PGD and L2 PGD accuracy on the
test set.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import attacks
import checkpoints
import cli
import models
import parallel
import train
from data import balanced_subset, batches, load_dataset, num_batches
from utils import MetricsLog, UserError, atomic_json, atomic_pickle, file_record, restricted_load, run_config


def loader_is_adversarial(letter, epoch, flip_epoch):
    return letter == "A" or (letter == "F" and epoch >= flip_epoch)


def epoch_seed(seed, phase, epoch):
    """Seed of the shuffling order of one epoch, derived from the run seed."""
    return np.random.SeedSequence([seed, phase, epoch]).generate_state(1)[0]


def phase2_dynamics(args):
    return cli.dynamics_name(not args.do_standard_second, args.centering)


class Run:
    """Everything one experiment needs, built once: data, model, jitted steps, outputs.

    The resume record is `resume_file` in --save_path; `resume` is what --resume read from it
    (None for a new run). `prepare_save_path(args)` is called once the inputs
    (--base_model_path, the data) are checked and before anything is written. With
    --constant_save, phase 1 also saves at the epochs `fractions`. `inputs` records the input
    files by content (utils.file_record), so a moved run folder still knows its base model."""

    def __init__(self, args, prepare_save_path, *, resume_file, resume, fractions):
        self.args = args
        self.resume_path = os.path.join(args.save_path, resume_file)
        self.resume, self.fractions = resume, tuple(fractions)
        self.inputs = run_inputs(args)
        self.base = None
        if args.base_model_path:
            self.base = checkpoints.open_network(args.base_model_path, model=args.model, width=args.width,
                                                 dataset=args.dataset, flag="--base_model_path")
        self.model = self.base.model if self.base else args.model or checkpoints.DEFAULTS["model"]
        self.width = self.base.width if self.base else args.width or models.default_width(self.model)
        self.architecture = (self.base.architecture if self.base else
                             cli.architecture_record(self.model, args)
                             if self.model in models.ARCHITECTURE_NETWORKS else {})
        self._load_data()
        prepare_save_path(args)
        self.init, self.apply = models.get_model(self.model, self.ds.num_classes, self.width, **self.architecture)
        self.key = jax.random.PRNGKey(args.random_seed)
        if self.base:
            self.init_params, self.init_state = self.base.ckpt["params"], self.base.ckpt["net_state"]
        else:
            self.init_params, self.init_state = self.init(jax.random.fold_in(self.key, 0),
                                                          jnp.asarray(self.x_train[:2]), True)
        self.eps = cli.eps_from_255(args.eps)
        self.attack = train_attack(args)
        self._steps = {}
        self.metrics = MetricsLog(os.path.join(args.save_path, "metrics.jsonl"))
        if not args.resume:
            self.metrics.reset()
            atomic_json(os.path.join(args.save_path, "config.json"), {**run_config(args), "inputs": self.inputs})

    def _load_data(self):
        a = self.args
        self.ds = ds = load_dataset(a.dataset, a.data_dir)
        self.x_train, self.y_train, self.x_test, self.y_test = ds.x_train, ds.y_train, ds.x_test, ds.y_test
        if a.train_size:
            self.x_train, self.y_train, _ = balanced_subset(ds.x_train, ds.y_train, a.train_size, a.random_seed,
                                                            ds.num_classes, "--train_size")
        if a.test_size:
            self.x_test, self.y_test, _ = balanced_subset(ds.x_test, ds.y_test, a.test_size, a.random_seed,
                                                          ds.num_classes, "--test_size")

    # ---------------------------------------------------------------------------------
    def meta(self, **extra):
        return {"model": self.model, "width": self.width, "num_classes": self.ds.num_classes,
                "input_shape": list(self.ds.input_shape), "dataset": self.ds.name,
                "loaders": self.args.loaders, "random_seed": self.args.random_seed, "training": training_record(self.args),
                **({"architecture": self.architecture} if self.architecture else {}), **extra}

    def save(self, name, params, lin_params, net_state, **meta):
        checkpoints.save_checkpoint(os.path.join(self.args.save_path, name), params, lin_params, net_state,
                                    self.meta(**meta))

    def save_trained(self, name, dynamics, theta, theta0, net_state, **meta):
        """Save a network trained in `dynamics` in the reference's layout (checkpoints.stored_as)."""
        self.save(name, *checkpoints.stored_as(dynamics, theta, theta0), net_state, dynamics=dynamics, **meta)

    def optimizer(self, lr):
        return train.make_optimizer(lr, self.args.momentum)

    def train_step(self, dynamics, is_training):
        key = (dynamics, is_training)
        if key not in self._steps:  # lr and momentum come from the optimizer state
            self._steps[key] = train.make_train_step(self.apply, dynamics, is_training, self.optimizer(0.0))
        return self._steps[key]

    def predict(self, dynamics):
        key = ("predict", dynamics)
        if key not in self._steps:
            self._steps[key] = attacks.make_predict(self.apply, dynamics)
        return self._steps[key]


# --------------------------------------------------------------------------------------
# One epoch, one evaluation
# --------------------------------------------------------------------------------------
def train_attack(args):
    """The training attack of the flags: {'steps', 'step_size' (pixels), 'random_start',
    'clip_iterates' (attacks.pgd)}. The
    reference's is PGD-20 with step 2 eps / 20 from a random start; FGSM is one step of eps from
    the clean image (Goodfellow et al. 2015; Tsilivis & Kempe's adv_train1)."""
    eps = cli.eps_from_255(args.eps)
    if args.train_attack == "fgsm":
        return {"steps": 1, "step_size": eps, "random_start": False, "clip_iterates": True}
    step = 2 * eps / args.train_steps if args.train_step_size is None else cli.eps_from_255(args.train_step_size)
    return {"steps": args.train_steps, "step_size": step, "random_start": not args.no_train_random_start,
            "clip_iterates": not args.clip_at_end}


def training_record(args):
    """How the run trains, beyond --loaders: kept in every checkpoint's meta."""
    return {"optimizer": "sgd", "lr": args.lr, "momentum": args.momentum, "lr_schedule": args.lr_schedule,
            "adv_only": bool(args.adv_only), "eps": cli.eps_from_255(args.eps), "attack": args.train_attack,
            **train_attack(args)}


def adversarial_batch(exp, state, theta0, xb, yb, dynamics, key):
    """The training attack's examples of a batch against the current model (BatchNorm in
    inference mode): L-inf PGD on the cross-entropy, sign steps, clipped to the eps-ball and
    [0, 1] after each (attacks.pgd)."""
    a = exp.attack
    return attacks.pgd(exp.predict(dynamics), (state.params, theta0, state.net_state), xb, yb, key, exp.eps,
                       a["step_size"], steps=a["steps"], random_start=a["random_start"],
                       clip_iterates=a["clip_iterates"])


def batch_update(exp, state, theta0, xb, yb, dynamics, is_training, attack_key):
    """One clean step, and with `attack_key` (adversarial loader), as the reference: the
    training attack against the just-updated model, then a second step on its examples; with
    --adv_only, only the step on the examples (made against the model before the batch).
    Returns (state, [metrics of each step])."""
    step = exp.train_step(dynamics, is_training)
    outs = []
    if attack_key is None or not exp.args.adv_only:
        state, m = step(state, theta0, xb, yb)
        outs.append(m)
    if attack_key is not None:
        x_adv = adversarial_batch(exp, state, theta0, xb, yb, dynamics, attack_key)
        state, m = step(state, theta0, x_adv, yb)
        outs.append(m)
    return state, outs


def train_epoch(exp, state, theta0, phase, epoch, dynamics, is_training, adversarial, on_batch=None):
    """One epoch over the training set. Returns (state, {'loss', 'acc'})."""
    state, theta0 = parallel.replicate((state, theta0))  # no-op with one device
    n_batches = num_batches(len(exp.x_train), exp.args.batch_size)
    attack_key = jax.random.fold_in(jax.random.fold_in(exp.key, 1000 + phase), epoch)
    tot_loss, tot_correct, seen = 0.0, 0, 0
    bar = tqdm(total=n_batches, desc=f"phase {phase} epoch {epoch}{' (adv)' if adversarial else ''}",
               leave=False, disable=exp.args.no_progress or None, dynamic_ncols=True)
    for i, (xb, yb) in enumerate(batches(exp.x_train, exp.y_train, exp.args.batch_size,
                                        epoch_seed(exp.args.random_seed, phase, epoch))):
        # Split over the devices (if several); a batch that does not divide is replicated,
        # never padded, so every step sees exactly its real examples (parallel.py).
        (xb, yb), _ = parallel.shard_batch((xb, yb), pad=False)
        state, outs = batch_update(exp, state, theta0, xb, yb, dynamics, is_training,
                                   jax.random.fold_in(attack_key, i) if adversarial else None)
        loss = float(np.mean([float(o["loss"]) for o in outs]))
        # The loss is taken before each update, so the updated state is checked as well:
        # nothing non-finite may reach a checkpoint (the fractional ones are saved below).
        if not np.isfinite(loss) or not all(bool(o["finite"]) for o in outs):
            what = f"loss ({loss})" if not np.isfinite(loss) else "parameters or optimizer state"
            raise UserError(f"non-finite {what} in phase {phase}, epoch {epoch}, batch {i}: "
                            f"stopped before saving it; the checkpoints already in {exp.args.save_path} are kept")
        tot_loss += loss * len(yb)
        tot_correct += int(outs[-1]["correct"])
        seen += len(yb)
        bar.set_postfix(loss=f"{tot_loss / seen:.4f}", acc=f"{tot_correct / seen:.3f}")
        bar.update()
        if on_batch is not None:
            on_batch(i, n_batches, state)
    bar.close()
    return state, {"loss": tot_loss / seen, "acc": tot_correct / seen}


def evaluate(exp, name, dynamics, theta, theta0, net_state):
    """Clean, L-inf PGD and L2 PGD accuracy on the test set (fractions in [0, 1])."""
    steps = exp.args.pgd_eval_steps
    configs = {"linf": attacks.attack_from_args(exp.args, "linf", exp.eps, steps),
               "l2": attacks.attack_from_args(exp.args, "l2", cli.L2_EPS, steps, step_size=cli.L2_STEP_SIZE)}
    out, details = {}, {}
    for i, (norm, cfg) in enumerate(configs.items()):
        with tqdm(total=len(exp.x_test), desc=f"eval {name} {norm}", leave=False,
                  disable=exp.args.no_progress or None) as bar:
            res = attacks.evaluate(exp.predict(dynamics), (theta, theta0, net_state), exp.x_test, exp.y_test,
                                   batch_size=100, attack=cfg, key=jax.random.fold_in(exp.key, 2000 + i),
                                   progress=bar)
        out["clean"] = res["acc_clean"]
        out[norm] = res["acc_adv"]
        details[norm] = {**cfg.describe(), "n": res["n"], "warnings": res.get("warnings", [])}
    exp.metrics.write(event="eval", phase=name, dynamics=dynamics, **out, attacks=details)
    print(f"[{name}] dynamics={dynamics} clean={out['clean']:.4f} linf={out['linf']:.4f} l2={out['l2']:.4f}")
    return out


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------
def _flatten(tree):
    return checkpoints.to_numpy(jax.tree_util.tree_leaves(tree))


def _unflatten(like, leaves):
    treedef = jax.tree_util.tree_structure(like)
    if treedef.num_leaves != len(leaves):
        raise UserError("the resume checkpoint does not fit this run's model or optimizer")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])


def save_resume(exp, progress, state, theta0):
    """Everything needed to continue exactly: train state with optimizer, theta0, phase,
    next epoch, results so far, the flags and input files. Written atomically after every epoch;
    phase 3 means finished (the final files are written)."""
    obj = {"args": dict(vars(exp.args)), "inputs": exp.inputs, "progress": progress, "state": _flatten(state),
           "theta0": None if theta0 is None else _flatten(theta0)}
    atomic_pickle(exp.resume_path, obj)


def run_inputs(args):
    """The run's input files as its records keep them: {'base_model_path': file_record} or {}."""
    return {"base_model_path": file_record(args.base_model_path)} if args.base_model_path else {}


def load_resume(path, save_path):
    """The record save_resume wrote at `path` (--resume), or a one-line error."""
    if not os.path.exists(path):
        raise UserError(f"--resume: no {os.path.basename(path)} in {save_path}; nothing to resume")
    obj = restricted_load(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("args"), dict) or "progress" not in obj:
        raise UserError(f"--resume: {path} is not a resume record of run_exp.py")
    return obj


# --------------------------------------------------------------------------------------
# The two phases
# --------------------------------------------------------------------------------------
def fresh_phase2_optimizer(exp):
    """Phase 2 starts a fresh SGD at --second_lr, except --do_standard_second after phase 1,
    which continues phase 1's optimizer (lr and momentum), as the reference."""
    return not (exp.args.do_standard_second and exp.base is None)


def initial_state(exp):
    """(state, theta0, progress) to start from: the initial or base parameters, or where an
    interrupted run stopped (exp.resume)."""
    resume = exp.resume
    results = {"standard": {"clean": 0.0, "l2": 0.0, "linf": 0.0},
               "linear": {"clean": 0.0, "l2": 0.0, "linf": 0.0},
               "standard_second": bool(exp.args.do_standard_second)}
    progress = {"phase": 1, "epoch": 0, "fractions_done": [], "results": results}
    params, net_state = exp.init_params, exp.init_state
    state = train.TrainState(params, net_state, exp.optimizer(exp.args.lr).init(params), jnp.zeros((), jnp.int32))
    if resume is None:
        return state, None, progress
    progress = resume["progress"]
    template = state
    if progress["phase"] == 2 and fresh_phase2_optimizer(exp):
        template = state._replace(opt_state=exp.optimizer(exp.args.second_lr).init(params))
    state = _unflatten(template, resume["state"])
    theta0 = None if resume["theta0"] is None else _unflatten(params, resume["theta0"])
    return state, theta0, progress


def run_phase1(exp, state, progress):
    """Phase 1: standard dynamics, lr schedule, constant saves, evaluation (of the base model
    after --base_model_path, which skips the training). Returns (state, theta0)."""
    a, done = exp.args, set(progress["fractions_done"])
    n_epochs = 0 if exp.base else a.standard_epochs

    def save(name, st, epoch):
        if a.constant_save:  # phase-1 saves: params = theta_t, lin_params = the initial parameters
            exp.save(name, st.params, exp.init_params, st.net_state, epoch=epoch, phase=1, dynamics="standard")

    for epoch in range(progress["epoch"], n_epochs):
        save(f"parameters_checkpoint_{epoch}.pkl", state, epoch)
        state = state._replace(opt_state=train.set_lr(state.opt_state, train.phase1_lr(epoch, a.lr, a.lr_schedule)))
        adversarial = loader_is_adversarial(a.loaders[0], epoch, a.flip_epoch)

        def on_batch(i, n, st, epoch=epoch):
            for frac in exp.fractions:
                if frac not in done and epoch + (i + 1) / n >= frac and frac < epoch + 1:
                    save(f"parameters_checkpoint_{frac:g}.pkl", st, frac)
                    done.add(frac)

        t0 = time.time()
        state, m = train_epoch(exp, state, state.params, 1, epoch, "standard", True, adversarial, on_batch)
        exp.metrics.write(event="epoch", phase=1, epoch=epoch, lr=train.get_lr(state.opt_state),
                          adversarial=adversarial, seconds=time.time() - t0, **m)
        print(f"phase 1 epoch {epoch}: loss {m['loss']:.4f} acc {m['acc']:.4f}{' (adversarial)' if adversarial else ''}")
        progress.update(epoch=epoch + 1, fractions_done=sorted(done))
        save_resume(exp, progress, state, None)
    if n_epochs > 0:
        save(f"parameters_checkpoint_{n_epochs}.pkl", state, n_epochs)
    if not a.skip_first_test:
        progress["results"]["standard"] = evaluate(exp, "phase 1", "standard", state.params, state.params,
                                                   state.net_state)
    # Phase 2 starts from here: theta0 is the phase-1 result, theta starts as its copy.
    theta0 = state.params
    if fresh_phase2_optimizer(exp):
        state = state._replace(opt_state=exp.optimizer(a.second_lr).init(state.params))
    progress.update(phase=2, epoch=0)
    save_resume(exp, progress, state, theta0)
    return state, theta0


def run_phase2(exp, state, theta0, progress):
    """Phase 2 in the dynamics of --do_standard_second/--centering. Returns the state."""
    a = exp.args
    dynamics = phase2_dynamics(a)
    for epoch in range(progress["epoch"], a.linear_epochs):
        adversarial = loader_is_adversarial(a.loaders[1], epoch, a.flip_epoch)
        t0 = time.time()
        state, m = train_epoch(exp, state, theta0, 2, epoch, dynamics, a.loose_bn_second, adversarial)
        exp.metrics.write(event="epoch", phase=2, epoch=epoch, lr=train.get_lr(state.opt_state), dynamics=dynamics,
                          adversarial=adversarial, seconds=time.time() - t0, **m)
        print(f"phase 2 ({dynamics}) epoch {epoch}: loss {m['loss']:.4f} acc {m['acc']:.4f}"
              f"{' (adversarial)' if adversarial else ''}")
        if a.constant_save_linear:
            exp.save_trained(f"parameters_checkpoint_linear_{epoch}.pkl", dynamics, state.params, theta0,
                             state.net_state, epoch=epoch + 1, phase=2)
        progress.update(epoch=epoch + 1)
        save_resume(exp, progress, state, theta0)
    if a.linear_epochs > 0 and not a.skip_second_test:
        progress["results"]["linear"] = evaluate(exp, "phase 2", dynamics, state.params, theta0, state.net_state)
    return state


def save_final(exp, state, theta0):
    """parameters_final.pkl in the reference's layout: a phase-1-only run stores its result
    in both keys (the reference copies theta into lin_params before phase 2 in any case)."""
    a = exp.args
    if a.linear_epochs > 0:
        exp.save_trained("parameters_final.pkl", phase2_dynamics(a), state.params, theta0, state.net_state,
                         epoch=a.linear_epochs, phase=2, centering=a.centering)
    else:
        exp.save_trained("parameters_final.pkl", "standard", state.params, state.params, state.net_state,
                         epoch=0 if exp.base else a.standard_epochs, phase=1)


def run_phases(exp, state, theta0, progress):
    """From where `progress` stands: phase 1 (unless it is done), phase 2, then with
    --save_models parameters_final.pkl and results.pkl/json; the resume record then marks the
    run finished (phase 3). Returns the results dict."""
    if progress["phase"] == 1:
        state, theta0 = run_phase1(exp, state, progress)
    state = run_phase2(exp, state, theta0, progress)
    results = progress["results"]
    if exp.args.save_models:
        save_final(exp, state, theta0)
        atomic_pickle(os.path.join(exp.args.save_path, "results.pkl"), results)
        atomic_json(os.path.join(exp.args.save_path, "results.json"), results)
    progress.update(phase=3, results=results)
    save_resume(exp, progress, state, theta0)
    return results
