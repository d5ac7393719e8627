"""Phase-1 and phase-2 training of Loo et al. (2022), standard or adversarial, in standard,
linearized or centered dynamics. See docs/scripts.md for the flags and the files written."""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np

import cli
from utils import UserError, run_main

FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
RESUME_FILE = "resume.pkl"
# Flags that may differ between an interrupted run and its --resume.
RESUME_FREE_FLAGS = ("resume", "no_progress", "overwrite")
# Flags that choose what is written or shown, not what is trained: a finished run rerun with
# other values of these is the same run, and may replace its files.
OUTPUT_FLAGS = RESUME_FREE_FLAGS + ("save_models", "constant_save", "constant_save_linear", "save_path")
# The files a run writes in --save_path (--overwrite removes these, and only these).
RUN_FILES = ("config.json", "metrics.jsonl", RESUME_FILE, "results.pkl", "results.json", "parameters_final.pkl")
CHECKPOINT_FILE_RE = re.compile(r"^parameters_checkpoint_(linear_)?\d+(\.\d+)?\.pkl$")
EXAMPLES = [
    "python run_exp.py --dataset digits --model resnet18 --width 8 --loaders AC --standard_epochs 20 "
    "--linear_epochs 0 --eps 32 --constant_save --save_models --save_path runs/phase1_AC",
    "python run_exp.py --base_model_path runs/phase1_AC/parameters_checkpoint_10.pkl --dataset digits "
    "--linear_epochs 10 --centering --loaders CC --save_models --save_path runs/phase2_centered",
]


def build_parser():
    p = cli.parser("Train a network in phase 1 (standard dynamics) and phase 2 (linearized, centered or "
                   "standard dynamics), clean or adversarial, and evaluate it.", EXAMPLES)
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
    cli.add_network_args(g, dataset_default="cifar10")
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
    cli.add_attack_args(g)
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default="./saved_models/", help="run directory for every output")
    g.add_argument("--save_models", action="store_true",
                   help="write parameters_final.pkl and results.pkl (+ results.json)")
    g.add_argument("--constant_save", action="store_true",
                   help="write parameters_checkpoint_{e}.pkl at the start of every phase-1 epoch, and "
                        "at 0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5 epochs")
    g.add_argument("--constant_save_linear", action="store_true",
                   help="write parameters_checkpoint_linear_{e}.pkl at the end of every phase-2 epoch e")
    g.add_argument("--random_seed", type=cli.seed, default=0, help="seed of every random choice (init, "
                   "shuffling, subsets, attack noise)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run from --save_path/{RESUME_FILE} (same flags)")
    g.add_argument("--overwrite", action="store_true",
                   help="when --save_path holds another run, delete that run's files (parameters_*.pkl, "
                        "results.*, config.json, metrics.jsonl, resume.pkl; other files are kept) before "
                        "starting; without it such a --save_path is refused")
    cli.add_no_progress(g)
    return p


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
    for flag in ("standard_epochs", "linear_epochs", "flip_epoch"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive (got {args.batch_size})")
    cli.check_attack_args(args, "pgd_eval_steps")
    if args.width is not None and args.width <= 0:
        raise UserError(f"--width must be positive (got {args.width})")
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --save_path and --overwrite deletes it: give one of them")
    if args.base_model_path is not None:
        from utils import check_file
        check_file(args.base_model_path, "--base_model_path", "a checkpoint file",
                   hints=("parameters_final.pkl", "parameters_*.pkl"))


def loader_is_adversarial(letter, epoch, flip_epoch):
    return letter == "A" or (letter == "F" and epoch >= flip_epoch)


def epoch_seed(seed, phase, epoch):
    """Seed of the shuffling order of one epoch, derived from the run seed."""
    return np.random.SeedSequence([seed, phase, epoch]).generate_state(1)[0]


def phase2_dynamics(args):
    return cli.dynamics_name(not args.do_standard_second, args.centering)


# --------------------------------------------------------------------------------------
# --save_path: one run per directory
# --------------------------------------------------------------------------------------
def run_files(save_path):
    """The files of a run_exp.py run in `save_path` (RUN_FILES and parameters_checkpoint_*)."""
    if not os.path.isdir(save_path):
        return []
    return sorted(name for name in os.listdir(save_path)
                  if name in RUN_FILES or CHECKPOINT_FILE_RE.match(name))


def _recorded_run(save_path):
    """(the flags of the run in `save_path` from its config.json or resume.pkl, or None; its
    progress from resume.pkl, or None)."""
    from utils import restricted_load
    flags, progress = None, None
    try:
        with open(os.path.join(save_path, "config.json")) as f:
            flags = json.load(f).get("args")
    except (OSError, ValueError, AttributeError):
        pass
    if os.path.isfile(os.path.join(save_path, RESUME_FILE)):
        try:
            resume = restricted_load(os.path.join(save_path, RESUME_FILE))
            progress = resume.get("progress")
            flags = flags if isinstance(flags, dict) else resume.get("args")
        except (UserError, AttributeError):
            pass
    return (flags if isinstance(flags, dict) else None), (progress if isinstance(progress, dict) else None)


def _describe_run(flags):
    what = f"{flags.get('model') or 'resnet18'} on {flags.get('dataset')}, --loaders {flags.get('loaders')}"
    if flags.get("base_model_path"):
        return f"{what}, {flags.get('linear_epochs')} phase-2 epochs from {flags['base_model_path']}"
    return f"{what}, {flags.get('standard_epochs')}+{flags.get('linear_epochs')} epochs"


def check_save_path(args):
    """Refuse a --save_path that holds another run (other training flags, an unfinished run,
    or files that record no flags), naming it and the ways out; --overwrite accepts it. Returns
    the run files that will be replaced (or removed, under --overwrite)."""
    from utils import plain
    p = args.save_path
    files = run_files(p)
    if not files:
        return []
    ways = ("to continue it, rerun its own command with --resume; or give another --save_path, or add --overwrite "
            "to delete its files first")
    if args.overwrite:
        base = args.base_model_path
        if base and any(os.path.exists(os.path.join(p, f)) and os.path.samefile(base, os.path.join(p, f))
                        for f in files):
            raise UserError(f"--overwrite would delete --base_model_path {base}, which is in --save_path {p}: "
                            f"give another --save_path")
        return files
    flags, progress = _recorded_run(p)
    if flags is None:
        raise UserError(f"--save_path {p} holds the files of a run ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''}) that record no flags: give another --save_path, "
                        f"or add --overwrite to delete them first")
    mine = plain(vars(args))
    for key, value in mine.items():
        if key not in OUTPUT_FLAGS and key in flags and flags[key] != value:
            raise UserError(f"--save_path {p} holds another run ({_describe_run(flags)}; it used --{key} "
                            f"{flags[key]!r}, not {value!r}): {ways}")
    if progress is not None and progress.get("phase") != 3:
        raise UserError(f"--save_path {p} holds an unfinished run with these flags (stopped in phase "
                        f"{progress.get('phase')} at epoch {progress.get('epoch')}): continue it with --resume, or "
                        f"add --overwrite to start it again")
    return files


def clear_run(save_path, files):
    """--overwrite: delete the previous run's files (only those run_exp.py writes)."""
    for name in files:
        try:
            os.remove(os.path.join(save_path, name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"--overwrite: cannot delete {os.path.join(save_path, name)}: {e.strerror or e}") from None
    kept = sorted(os.listdir(save_path))
    print(f"--overwrite: deleted {len(files)} files of the previous run in {save_path}"
          + (f"; kept {', '.join(kept)} (not written by run_exp.py)" if kept else ""))


class Run:
    """Everything one experiment needs, built once: data, model, jitted steps, outputs."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp

        import checkpoints
        import models
        from utils import MetricsLog, atomic_json, check_writable_dir, make_dir, run_config

        self.args = args
        self.base = None
        if args.base_model_path:
            self.base = checkpoints.open_network(args.base_model_path, model=args.model, width=args.width,
                                                 dataset=args.dataset, flag="--base_model_path")
        self.model = self.base.model if self.base else args.model or checkpoints.DEFAULTS["model"]
        self.width = self.base.width if self.base else args.width or checkpoints.DEFAULTS["width"]
        self._load_data()
        replaced = [] if args.resume else check_save_path(args)
        check_writable_dir(args.save_path)  # every input is checked before anything is written
        if args.overwrite and replaced:
            clear_run(args.save_path, replaced)
        elif replaced:
            print(f"note: {args.save_path} holds a finished run with the same flags: its files are replaced")
        make_dir(args.save_path)
        self.init, self.apply = models.get_model(self.model, self.ds.num_classes, self.width)
        self.key = jax.random.PRNGKey(args.random_seed)
        if self.base:
            self.init_params, self.init_state = self.base.ckpt["params"], self.base.ckpt["net_state"]
        else:
            self.init_params, self.init_state = self.init(jax.random.fold_in(self.key, 0),
                                                          jnp.asarray(self.x_train[:2]), True)
        self.eps = cli.eps_from_255(args.eps)
        self._steps = {}
        self.metrics = MetricsLog(os.path.join(args.save_path, "metrics.jsonl"))
        if not args.resume:
            self.metrics.reset()
            atomic_json(os.path.join(args.save_path, "config.json"), run_config(args))

    def _load_data(self):
        from data import balanced_subset, load_dataset
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
                "loaders": self.args.loaders, "random_seed": self.args.random_seed, **extra}

    def save(self, name, params, lin_params, net_state, **meta):
        from checkpoints import save_checkpoint
        save_checkpoint(os.path.join(self.args.save_path, name), params, lin_params, net_state, self.meta(**meta))

    def save_trained(self, name, dynamics, theta, theta0, net_state, **meta):
        """Save a network trained in `dynamics` in the reference's layout (checkpoints.stored_as)."""
        from checkpoints import stored_as
        self.save(name, *stored_as(dynamics, theta, theta0), net_state, dynamics=dynamics, **meta)

    def train_step(self, dynamics, is_training):
        import train
        key = (dynamics, is_training)
        if key not in self._steps:
            self._steps[key] = train.make_train_step(self.apply, dynamics, is_training, train.make_optimizer(0.0))
        return self._steps[key]

    def predict(self, dynamics):
        from attacks import make_predict
        key = ("predict", dynamics)
        if key not in self._steps:
            self._steps[key] = make_predict(self.apply, dynamics)
        return self._steps[key]


# --------------------------------------------------------------------------------------
# One epoch, one evaluation
# --------------------------------------------------------------------------------------
def batch_update(exp, state, theta0, xb, yb, dynamics, is_training, attack_key):
    """One clean step, and with `attack_key` (adversarial loader), as the reference: PGD
    against the just-updated model (BatchNorm in inference mode), then a second step on
    those examples. Returns (state, [metrics of each step])."""
    from attacks import pgd
    step = exp.train_step(dynamics, is_training)
    state, m = step(state, theta0, xb, yb)
    outs = [m]
    if attack_key is not None:
        x_adv = pgd(exp.predict(dynamics), (state.params, theta0, state.net_state), xb, yb, attack_key,
                    exp.eps, 2 * exp.eps / 20, steps=20)
        state, m = step(state, theta0, x_adv, yb)
        outs.append(m)
    return state, outs

def train_epoch(exp, state, theta0, phase, epoch, dynamics, is_training, adversarial, on_batch=None):
    """One epoch over the training set. Returns (state, {'loss', 'acc'})."""
    import jax
    from tqdm import tqdm

    import parallel
    from data import batches, num_batches

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
    import jax
    from tqdm import tqdm

    import attacks
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
    import jax

    from checkpoints import to_numpy
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
           "theta0": None if theta0 is None else _flatten(theta0)}
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


# --------------------------------------------------------------------------------------
# The two phases
# --------------------------------------------------------------------------------------
def fresh_phase2_optimizer(exp):
    """Phase 2 starts a fresh SGD at --second_lr, except --do_standard_second after phase 1,
    which continues phase 1's optimizer (lr and momentum), as the reference."""
    return not (exp.args.do_standard_second and exp.base is None)


def initial_state(exp, resume):
    """(state, theta0, progress) to start from: the initial or base parameters, or where an
    interrupted run stopped."""
    import jax.numpy as jnp

    import train
    results = {"standard": {"clean": 0.0, "l2": 0.0, "linf": 0.0},
               "linear": {"clean": 0.0, "l2": 0.0, "linf": 0.0},
               "standard_second": bool(exp.args.do_standard_second)}
    progress = {"phase": 1, "epoch": 0, "fractions_done": [], "results": results}
    params, net_state = exp.init_params, exp.init_state
    state = train.TrainState(params, net_state, train.make_optimizer(0.1).init(params), jnp.zeros((), jnp.int32))
    if resume is None:
        return state, None, progress
    progress = resume["progress"]
    template = state
    if progress["phase"] == 2 and fresh_phase2_optimizer(exp):
        template = state._replace(opt_state=train.make_optimizer(exp.args.second_lr).init(params))
    state = _unflatten(template, resume["state"])
    theta0 = None if resume["theta0"] is None else _unflatten(params, resume["theta0"])
    return state, theta0, progress


def run_phase1(exp, state, progress):
    """Phase 1: standard dynamics, lr schedule, constant saves, evaluation (of the base model
    after --base_model_path, which skips the training). Returns (state, theta0)."""
    import train
    a, done = exp.args, set(progress["fractions_done"])
    n_epochs = 0 if exp.base else a.standard_epochs

    def save(name, st, epoch):
        if a.constant_save:  # phase-1 saves: params = theta_t, lin_params = the initial parameters
            exp.save(name, st.params, exp.init_params, st.net_state, epoch=epoch, phase=1, dynamics="standard")

    for epoch in range(progress["epoch"], n_epochs):
        save(f"parameters_checkpoint_{epoch}.pkl", state, epoch)
        state = state._replace(opt_state=train.set_lr(state.opt_state, train.phase1_lr(epoch)))
        adversarial = loader_is_adversarial(a.loaders[0], epoch, a.flip_epoch)

        def on_batch(i, n, st, epoch=epoch):
            for frac in FRACTIONAL_EPOCHS:
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
        state = state._replace(opt_state=train.make_optimizer(a.second_lr).init(state.params))
    progress.update(phase=2, epoch=0)
    save_resume(exp, progress, state, theta0)
    return state, theta0


def run_phase2(exp, state, theta0, progress):
    """Phase 2 in the dynamics of --do_standard_second/--centering. Returns the state."""
    import train
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


def print_results(results, args):
    """The accuracies as a small table (results.json keeps the full numbers); phases that were not
    evaluated say so instead of showing zeros."""
    evaluated = {"standard": not args.skip_first_test,
                 "linear": args.linear_epochs > 0 and not args.skip_second_test}
    print("accuracy   clean    L-inf PGD  L2 PGD")
    for phase, name in (("standard", "phase 1"), ("linear", "phase 2")):
        res = results[phase]
        if evaluated[phase]:
            print(f"{name}    {res['clean']:.4f}   {res['linf']:.4f}     {res['l2']:.4f}")
        else:
            print(f"{name}    not evaluated")


def run(args):
    """Run the whole experiment. Returns the results dict (also written as results.pkl/json)."""
    from utils import atomic_json, atomic_pickle

    validate(args)
    resume = load_resume(args) if args.resume else None
    exp = Run(args)
    state, theta0, progress = initial_state(exp, resume)
    results = progress["results"]
    if progress["phase"] == 3:
        print(f"the run in {args.save_path} had already finished")
        print_results(results, args)
        return results
    if resume is not None:
        print(f"resuming phase {progress['phase']} at epoch {progress['epoch']}")
    t_start = time.time()
    if progress["phase"] == 1:
        state, theta0 = run_phase1(exp, state, progress)
    state = run_phase2(exp, state, theta0, progress)
    if args.save_models:
        save_final(exp, state, theta0)
        atomic_pickle(os.path.join(args.save_path, "results.pkl"), results)
        atomic_json(os.path.join(args.save_path, "results.json"), results)
    progress.update(phase=3, results=results)
    save_resume(exp, progress, state, theta0)
    print(f"done in {time.time() - t_start:.1f}s")
    print_results(results, args)
    final = os.path.join(args.save_path, "parameters_final.pkl")
    if not args.save_models and (args.constant_save or args.constant_save_linear):
        print(f"{final} was not written (add --save_models to write it); the constant saves are in {args.save_path}")
    elif not args.save_models:
        print(f"no checkpoint was written: add --save_models to write {final}")
    return results


def main(argv=None):
    return run_main(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
