"""Phase-1 and phase-2 training of Loo et al. (2022), standard or adversarial, in standard,
linearized or centered dynamics. See README.md for the flags and the files written."""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from utils import UserError, run_main

FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
RESUME_FILE = "resume.pkl"
# Flags that may differ between an interrupted run and its --resume.
RESUME_FREE_FLAGS = ("resume", "no_progress")


def build_parser():
    p = argparse.ArgumentParser(
        description="Train a network in phase 1 (standard dynamics) and phase 2 (linearized, "
                    "centered or standard dynamics), clean or adversarial, and evaluate it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("phases")
    g.add_argument("--standard_epochs", type=int, default=100, help="phase-1 epochs (standard dynamics)")
    g.add_argument("--linear_epochs", type=int, default=100, help="phase-2 epochs")
    g.add_argument("--loaders", default="CC",
                   help="two letters, phase 1 then phase 2: C clean, A adversarial, F clean before "
                        "--flip_epoch then adversarial. Adversarial means, as in the reference, TWO "
                        "optimizer steps per batch: one on the clean batch, then one on PGD examples "
                        "made against the just-updated model")
    g.add_argument("--eps", type=float, default=4.0,
                   help="L-inf radius in 1/255 units for adversarial training (PGD-20, step 2eps/20) "
                        "and the L-inf evaluation")
    g.add_argument("--flip_epoch", type=int, default=50, help="epoch at which loader F turns adversarial")
    g.add_argument("--base_model_path", default=None,
                   help="start from this checkpoint and skip phase 1")
    g.add_argument("--second_lr", type=float, default=0.01, help="phase-2 learning rate (SGD, momentum 0.9)")
    g.add_argument("--centering", action="store_true",
                   help="phase 2 trains the centered model: J(theta0)(theta-theta0), or "
                        "f(theta)-f(theta0) with --do_standard_second")
    g.add_argument("--do_standard_second", action="store_true",
                   help="phase 2 uses standard dynamics (continuing phase 1's optimizer, or a fresh "
                        "SGD at --second_lr after --base_model_path)")
    g.add_argument("--loose_bn_second", action="store_true",
                   help="phase 2 BatchNorm uses batch statistics instead of frozen running averages")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="cifar10", choices=("cifar10", "cifar100", "digits"),
                   help="dataset; digits is scikit-learn's bundled 8x8 set and needs no download")
    g.add_argument("--data_dir", default="./data", help="directory holding (or receiving) the CIFAR files")
    g.add_argument("--model", default=None, choices=("resnet18", "mlp_skinny", "mlp_wide", "linear"),
                   help="network (default resnet18, or the --base_model_path checkpoint's)")
    g.add_argument("--width", type=int, default=None,
                   help="ResNet channel width w: groups have w, 2w, 4w, 8w channels "
                        "(default 64, or the checkpoint's)")
    g.add_argument("--train_size", type=int, default=None,
                   help="train on a seeded class-balanced subset of this many images")
    g.add_argument("--test_size", type=int, default=None,
                   help="evaluate on a seeded class-balanced subset of this many test images")
    g.add_argument("--batch_size", type=int, default=128, help="training batch size")
    g = p.add_argument_group("evaluation")
    g.add_argument("--skip_first_test", action="store_true", help="skip the evaluation after phase 1")
    g.add_argument("--skip_second_test", action="store_true", help="skip the evaluation after phase 2")
    g.add_argument("--pgd_eval_steps", type=int, default=100,
                   help="steps of the L-inf and L2 evaluation attacks")
    _add_attack_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="./saved_models/", help="run directory for every output")
    g.add_argument("--save_models", action="store_true",
                   help="write parameters_final.pkl and results.pkl (+ results.json)")
    g.add_argument("--constant_save", action="store_true",
                   help="write parameters_checkpoint_{e}.pkl at the start of every phase-1 epoch, and "
                        "at 0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5 epochs")
    g.add_argument("--constant_save_linear", action="store_true",
                   help="write parameters_checkpoint_linear_{e}.pkl at the end of every phase-2 epoch e")
    g.add_argument("--random_seed", type=int, default=0, help="seed of every random choice (init, "
                   "shuffling, subsets, attack noise)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from --save_path/{RESUME_FILE} (same flags)")
    g.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def _add_attack_args(p):
    """The evaluation-attack options shared with eval_and_make_adv.py, when attacks.py has them."""
    import attacks
    if hasattr(attacks, "add_attack_args"):
        attacks.add_attack_args(p)


# --------------------------------------------------------------------------------------
def validate(args):
    """Reject bad flags before any work starts."""
    if len(args.loaders) != 2 or any(c not in "CAF" for c in args.loaders):
        raise UserError(f"--loaders must be two letters from C, A, F (got {args.loaders!r})")
    if not args.eps >= 0:  # also refuses nan
        raise UserError(f"--eps must be >= 0 (got {args.eps})")
    if not 0 <= args.second_lr < float("inf"):
        raise UserError(f"--second_lr must be finite and >= 0 (got {args.second_lr})")
    for flag in ("train_size", "test_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
    for flag in ("standard_epochs", "linear_epochs", "flip_epoch", "pgd_eval_steps"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive (got {args.batch_size})")
    if args.width is not None and args.width <= 0:
        raise UserError(f"--width must be positive (got {args.width})")
    if args.base_model_path is not None and not os.path.isfile(args.base_model_path):
        raise UserError(f"--base_model_path {args.base_model_path} does not exist")


def loader_is_adversarial(letter, epoch, flip_epoch):
    return letter == "A" or (letter == "F" and epoch >= flip_epoch)


def epoch_seed(seed, phase, epoch):
    """Seed of the shuffling order of one epoch, derived from the run seed."""
    return np.random.SeedSequence([seed, phase, epoch]).generate_state(1)[0]


class Run:
    """Everything one experiment needs, built once: data, model, jitted steps, outputs."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        from data import balanced_subset, load_dataset
        from models import get_model
        from utils import (MetricsLog, atomic_json, check_meta, check_writable_dir, load_checkpoint,
                           load_into_model, run_config)

        self.args = args
        check_writable_dir(args.save_path)
        base = load_checkpoint(args.base_model_path) if args.base_model_path else None
        meta = base["meta"] if base else {}
        self.model = args.model or meta.get("model", "resnet18")
        self.width = args.width or meta.get("width", 64)
        if base:
            check_meta(meta, args.base_model_path, model=self.model, width=self.width)
        if base and meta.get("dataset") not in (None, args.dataset):
            raise UserError(f"{args.base_model_path} was trained on {meta['dataset']} but "
                            f"--dataset {args.dataset} was requested")
        ds = load_dataset(args.dataset, args.data_dir)
        check_meta(meta, args.base_model_path, num_classes=ds.num_classes)
        self.ds = ds
        self.x_train, self.y_train = ds.x_train, ds.y_train
        if args.train_size:
            self.x_train, self.y_train, _ = balanced_subset(ds.x_train, ds.y_train, args.train_size,
                                                            args.random_seed, ds.num_classes, "--train_size")
        self.x_test, self.y_test = ds.x_test, ds.y_test
        if args.test_size:
            self.x_test, self.y_test, _ = balanced_subset(ds.x_test, ds.y_test, args.test_size,
                                                          args.random_seed, ds.num_classes, "--test_size")
        self.init, self.apply = get_model(self.model, ds.num_classes, self.width)
        self.key = jax.random.PRNGKey(args.random_seed)
        params, net_state = self.init(jax.random.fold_in(self.key, 0), jnp.asarray(self.x_train[:2]), True)
        self.init_params, self.init_state = params, net_state
        if base:
            base = load_into_model(args.base_model_path, params, net_state)
        self.base = base
        self.eps = args.eps / 255.0
        self._steps = {}
        self.metrics = MetricsLog(os.path.join(args.save_path, "metrics.jsonl"))
        if not args.resume:
            self.metrics.reset()
            atomic_json(os.path.join(args.save_path, "config.json"), run_config(args))

    # ---------------------------------------------------------------------------------
    def meta(self, **extra):
        return {"model": self.model, "width": self.width, "num_classes": self.ds.num_classes,
                "input_shape": list(self.ds.input_shape), "dataset": self.ds.name,
                "loaders": self.args.loaders, "random_seed": self.args.random_seed, **extra}

    def save(self, name, params, lin_params, net_state, **meta):
        from utils import save_checkpoint
        save_checkpoint(os.path.join(self.args.save_path, name), params, lin_params, net_state, self.meta(**meta))

    def train_step(self, dynamics, is_training):
        from utils import make_optimizer, make_train_step
        key = (dynamics, is_training)
        if key not in self._steps:
            self._steps[key] = make_train_step(self.apply, dynamics, is_training, make_optimizer(0.0))
        return self._steps[key]

    def predict(self, dynamics):
        from attacks import make_predict
        key = ("predict", dynamics)
        if key not in self._steps:
            self._steps[key] = make_predict(self.apply, dynamics)
        return self._steps[key]

    # ---------------------------------------------------------------------------------
    def train_epoch(self, state, theta0, phase, epoch, dynamics, is_training, adversarial, on_batch=None):
        """One epoch over the training set. Returns (state, {'loss', 'acc'})."""
        import jax
        from tqdm import tqdm

        import parallel
        from attacks import pgd
        from data import batches, num_batches

        state, theta0 = parallel.replicate((state, theta0))  # no-op with one device
        step = self.train_step(dynamics, is_training)
        predict = self.predict(dynamics)
        n_batches = num_batches(len(self.x_train), self.args.batch_size)
        attack_key = jax.random.fold_in(jax.random.fold_in(self.key, 1000 + phase), epoch)
        tot_loss, tot_correct, seen = 0.0, 0, 0
        bar = tqdm(total=n_batches, desc=f"phase {phase} epoch {epoch}{' (adv)' if adversarial else ''}",
                   leave=False, disable=self.args.no_progress or None, dynamic_ncols=True)
        for i, (xb, yb) in enumerate(batches(self.x_train, self.y_train, self.args.batch_size,
                                            epoch_seed(self.args.random_seed, phase, epoch))):
            # Split over the devices (if several); a batch that does not divide is replicated,
            # never padded, so every step sees exactly its real examples (parallel.py).
            (xb, yb), _ = parallel.shard_batch((xb, yb), pad=False)
            state, m = step(state, theta0, xb, yb)
            outs = [m]
            if adversarial:
                # As the reference: the clean step above, then PGD against the just-updated
                # model (BatchNorm in inference mode), then a second step on those examples.
                x_adv = pgd(predict, (state.params, theta0, state.net_state), xb, yb,
                            jax.random.fold_in(attack_key, i), self.eps, 2 * self.eps / 20, steps=20)
                state, m = step(state, theta0, x_adv, yb)
                outs.append(m)
            loss = float(np.mean([float(o["loss"]) for o in outs]))
            # The loss is taken before each update, so the updated state is checked as well:
            # nothing non-finite may reach a checkpoint (the fractional ones are saved below).
            if not np.isfinite(loss) or not all(bool(o["finite"]) for o in outs):
                what = f"loss ({loss})" if not np.isfinite(loss) else "parameters or optimizer state"
                raise UserError(f"non-finite {what} in phase {phase}, epoch {epoch}, batch {i}: "
                                f"stopped before saving it; the checkpoints already in {self.args.save_path} are kept")
            tot_loss += loss * len(yb)
            tot_correct += int(m["correct"])
            seen += len(yb)
            bar.set_postfix(loss=f"{tot_loss / seen:.4f}", acc=f"{tot_correct / seen:.3f}")
            bar.update()
            if on_batch is not None:
                on_batch(i, n_batches, state)
        bar.close()
        return state, {"loss": tot_loss / seen, "acc": tot_correct / seen}

    def evaluate(self, name, dynamics, theta, theta0, net_state):
        """Clean, L-inf PGD and L2 PGD accuracy on the test set (fractions in [0, 1])."""
        import jax
        from tqdm import tqdm

        import attacks
        predict = self.predict(dynamics)
        variables = (theta, theta0, net_state)
        steps = self.args.pgd_eval_steps
        configs = {"linf": attacks.linf_config(self.eps, steps), "l2": attacks.l2_config(steps)}
        if hasattr(attacks, "attack_from_args"):
            configs = {"linf": attacks.attack_from_args(self.args, "linf", self.eps, steps),
                       "l2": attacks.attack_from_args(self.args, "l2", 0.25, steps, step_size=0.01)}
        out, details = {}, {}
        for i, (norm, cfg) in enumerate(configs.items()):
            with tqdm(total=len(self.x_test), desc=f"eval {name} {norm}", leave=False,
                      disable=self.args.no_progress or None) as bar:
                r = attacks.evaluate(predict, variables, self.x_test, self.y_test, batch_size=100, attack=cfg,
                                     key=jax.random.fold_in(self.key, 2000 + i), progress=bar)
            out["clean"] = r["acc_clean"]
            out[norm] = r["acc_adv"]
            details[norm] = {**cfg.describe(), "n": r["n"], "warnings": r.get("warnings", [])}
        self.metrics.write(event="eval", phase=name, dynamics=dynamics, **out, attacks=details)
        print(f"[{name}] dynamics={dynamics} clean={out['clean']:.4f} linf={out['linf']:.4f} l2={out['l2']:.4f}")
        return out


# --------------------------------------------------------------------------------------
def _flatten(tree):
    import jax
    from utils import to_numpy
    return to_numpy(jax.tree_util.tree_leaves(tree))


def _unflatten(like, leaves):
    import jax
    import jax.numpy as jnp
    treedef = jax.tree_util.tree_structure(like)
    if treedef.num_leaves != len(leaves):
        raise UserError("the resume checkpoint does not fit this run's model or optimizer")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])


def save_resume(run, progress, state, theta0):
    """Everything needed to continue exactly: train state with optimizer, theta0, phase,
    next epoch, results so far. Written atomically after every epoch."""
    from utils import atomic_pickle
    obj = {"args": {k: v for k, v in vars(run.args).items() if k not in RESUME_FREE_FLAGS},
           "progress": progress, "state": _flatten(state),
           "theta0": None if theta0 is None else _flatten(theta0), "init_params": _flatten(run.init_params)}
    atomic_pickle(os.path.join(run.args.save_path, RESUME_FILE), obj)


def load_resume(args):
    from utils import restricted_load
    path = os.path.join(args.save_path, RESUME_FILE)
    if not os.path.exists(path):
        raise UserError(f"--resume: no {RESUME_FILE} in {args.save_path}; nothing to resume")
    obj = restricted_load(path)
    saved = obj["args"]
    for k, v in vars(args).items():
        if k not in RESUME_FREE_FLAGS and k in saved and saved[k] != v:
            raise UserError(f"--resume: --{k} is {v!r} but the interrupted run used {saved[k]!r}")
    return obj


def run(args):
    """Run the whole experiment. Returns the results dict (also written as results.pkl/json)."""
    import jax.numpy as jnp

    from utils import (TrainState, atomic_json, atomic_pickle, get_lr, make_optimizer, phase1_lr,
                       set_lr)

    validate(args)
    resume = load_resume(args) if args.resume else None
    r = Run(args)
    a = args
    results = {"standard": {"clean": 0.0, "l2": 0.0, "linf": 0.0},
               "linear": {"clean": 0.0, "l2": 0.0, "linf": 0.0},
               "standard_second": bool(a.do_standard_second)}
    progress = {"phase": 1, "epoch": 0, "fractions_done": [], "results": results}
    opt = make_optimizer(0.1)
    theta0 = None

    phase1_epochs = 0 if r.base is not None else a.standard_epochs  # a base model skips phase 1
    if r.base is not None:
        params, net_state = r.base["params"], r.base["net_state"]
    else:
        params, net_state = r.init_params, r.init_state
    state = TrainState(params, net_state, opt.init(params), jnp.zeros((), jnp.int32))

    if resume is not None:
        progress = resume["progress"]
        results = progress["results"]
        template = state
        if progress["phase"] == 2 and not (a.do_standard_second and r.base is None):
            template = TrainState(params, net_state, make_optimizer(a.second_lr).init(params), state.step)
        state = _unflatten(template, resume["state"])
        theta0 = None if resume["theta0"] is None else _unflatten(params, resume["theta0"])
        if progress["phase"] == 3:
            print(f"the run in {a.save_path} had already finished: {results}")
            return results
        print(f"resuming phase {progress['phase']} at epoch {progress['epoch']}")

    init_params = r.init_params
    t_start = time.time()
    # ---------------------------------------------------------------- phase 1
    if progress["phase"] == 1:
        done = set(progress["fractions_done"])
        for epoch in range(progress["epoch"], phase1_epochs):
            if a.constant_save:
                r.save(f"parameters_checkpoint_{epoch}.pkl", state.params, init_params, state.net_state,
                       epoch=epoch, phase=1, dynamics="standard")
            state = state._replace(opt_state=set_lr(state.opt_state, phase1_lr(epoch)))
            adversarial = loader_is_adversarial(a.loaders[0], epoch, a.flip_epoch)

            def on_batch(i, n, st, epoch=epoch):
                for frac in FRACTIONAL_EPOCHS:
                    if a.constant_save and frac not in done and epoch + (i + 1) / n >= frac and frac < epoch + 1:
                        r.save(f"parameters_checkpoint_{frac:g}.pkl", st.params, init_params, st.net_state,
                               epoch=frac, phase=1, dynamics="standard")
                        done.add(frac)

            t0 = time.time()
            state, m = r.train_epoch(state, state.params, 1, epoch, "standard", True, adversarial, on_batch)
            r.metrics.write(event="epoch", phase=1, epoch=epoch, lr=get_lr(state.opt_state),
                            adversarial=adversarial, seconds=time.time() - t0, **m)
            print(f"phase 1 epoch {epoch}: loss {m['loss']:.4f} acc {m['acc']:.4f}"
                  f"{' (adversarial)' if adversarial else ''}")
            progress.update(epoch=epoch + 1, fractions_done=sorted(done))
            save_resume(r, progress, state, None)
        if a.constant_save and phase1_epochs > 0:
            r.save(f"parameters_checkpoint_{phase1_epochs}.pkl", state.params, init_params, state.net_state,
                   epoch=phase1_epochs, phase=1, dynamics="standard")
        if not a.skip_first_test:
            results["standard"] = r.evaluate("phase 1", "standard", state.params, state.params, state.net_state)
        # Set up phase 2: theta0 is the phase-1 result, theta starts as its copy.
        theta0 = state.params
        if not (a.do_standard_second and r.base is None):
            state = TrainState(state.params, state.net_state, make_optimizer(a.second_lr).init(state.params),
                               state.step)
        progress.update(phase=2, epoch=0, results=results)
        save_resume(r, progress, state, theta0)

    # ---------------------------------------------------------------- phase 2
    if a.do_standard_second:
        dynamics = "standard_centered" if a.centering else "standard"
    else:
        dynamics = "centered" if a.centering else "linear"
    for epoch in range(progress["epoch"], a.linear_epochs):
        adversarial = loader_is_adversarial(a.loaders[1], epoch, a.flip_epoch)
        t0 = time.time()
        state, m = r.train_epoch(state, theta0, 2, epoch, dynamics, a.loose_bn_second, adversarial)
        r.metrics.write(event="epoch", phase=2, epoch=epoch, lr=get_lr(state.opt_state), dynamics=dynamics,
                        adversarial=adversarial, seconds=time.time() - t0, **m)
        print(f"phase 2 ({dynamics}) epoch {epoch}: loss {m['loss']:.4f} acc {m['acc']:.4f}"
              f"{' (adversarial)' if adversarial else ''}")
        if a.constant_save_linear:
            r.save(f"parameters_checkpoint_linear_{epoch}.pkl", theta0, state.params, state.net_state,
                   epoch=epoch + 1, phase=2, dynamics=dynamics)
        progress.update(epoch=epoch + 1)
        save_resume(r, progress, state, theta0)
    if a.linear_epochs > 0 and not a.skip_second_test:
        results["linear"] = r.evaluate("phase 2", dynamics, state.params, theta0, state.net_state)

    if a.save_models:
        if a.linear_epochs > 0:
            r.save("parameters_final.pkl", theta0, state.params, state.net_state,
                   epoch=a.linear_epochs, phase=2, dynamics=dynamics, centering=a.centering)
        else:
            r.save("parameters_final.pkl", state.params, init_params if r.base is None else r.base["lin_params"],
                   state.net_state, epoch=phase1_epochs, phase=1, dynamics="standard")
        atomic_pickle(os.path.join(a.save_path, "results.pkl"), results)
        atomic_json(os.path.join(a.save_path, "results.json"), results)
    progress.update(phase=3, results=results)
    save_resume(r, progress, state, theta0)
    print(f"done in {time.time() - t_start:.1f}s: {results}")
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(run, args)


if __name__ == "__main__":
    main()
