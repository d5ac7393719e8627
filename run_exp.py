"""Phase-1 and phase-2 training of Loo et al. (2022), standard or adversarial, in standard,
linearized or centered dynamics. This script parses and checks the flags, guards --save_path and
calls experiment.py, which trains. See docs/scripts.md for the flags and the files written."""
from __future__ import annotations

import json
import os
import re
import sys
import time

import cli
from utils import LOCK_FILE, UserError, run_main

FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
RESUME_FILE = "resume.pkl"
# Flags that choose what is written or shown, not what is trained: a finished run rerun with
# other values of these is the same run, and may replace its files; its --resume may change them.
OUTPUT_FLAGS = ("resume", "no_progress", "overwrite", "save_models", "constant_save", "constant_save_linear",
                "save_path")
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
    cli.check_eps(args.eps)
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
    for line in ignored_flags(args):
        print(f"warning: {line}", file=sys.stderr)


def ignored_flags(args):
    """Flags the reference accepts but that change nothing with the others given: one line each."""
    default = build_parser().get_default
    if args.base_model_path and args.standard_epochs != default("standard_epochs"):
        yield "--standard_epochs is ignored with --base_model_path: phase 1 is that checkpoint"
    if args.linear_epochs == 0:
        for flag in ("centering", "constant_save_linear", "do_standard_second", "loose_bn_second"):
            if getattr(args, flag):
                yield f"--{flag} is ignored with --linear_epochs 0: there is no phase 2"
    if args.constant_save and (args.standard_epochs == 0 or args.base_model_path):
        yield "--constant_save is ignored without phase-1 epochs: there is nothing to save"


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
    """(the flags of the run in `save_path` from its config.json or resume.pkl, or None; its input
    files' records, or None; its progress from resume.pkl, or None)."""
    from utils import restricted_load
    config, resume = {}, {}
    try:
        with open(os.path.join(save_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass
    if os.path.isfile(os.path.join(save_path, RESUME_FILE)):
        try:
            resume = restricted_load(os.path.join(save_path, RESUME_FILE))
        except UserError:
            pass
    config, resume = (d if isinstance(d, dict) else {} for d in (config, resume))
    flags = config.get("args") if isinstance(config.get("args"), dict) else resume.get("args")
    inputs = config.get("inputs", resume.get("inputs"))
    progress = resume.get("progress")
    return (flags if isinstance(flags, dict) else None), inputs, (progress if isinstance(progress, dict) else None)


def _describe_run(flags):
    what = f"{flags.get('model') or 'resnet18'} on {flags.get('dataset')}, --loaders {flags.get('loaders')}"
    if flags.get("base_model_path"):
        return f"{what}, {flags.get('linear_epochs')} phase-2 epochs from {flags['base_model_path']}"
    return f"{what}, {flags.get('standard_epochs')}+{flags.get('linear_epochs')} epochs"


def first_difference(flags, inputs, args):
    """The first training flag in which `args` differs from a recorded run (its `flags`, and its
    `inputs`: the input files by content): (flag, recorded, given), or None for the same run.
    Output flags (OUTPUT_FLAGS, --save_path among them) and where the input files now lie do
    not count: a run folder moved or copied elsewhere is still its own run."""
    from utils import file_record, plain, same_input, shown
    mine = plain(vars(args))
    for key, value in mine.items():
        if key in OUTPUT_FLAGS or key not in flags:
            continue
        if key == "base_model_path" and value and isinstance(inputs, dict) and key in inputs:
            if not same_input(plain(inputs[key]), plain(file_record(value))):
                return key, f"{shown(flags[key])} (other contents)", shown(value)
        elif flags[key] != value:
            return key, shown(flags[key]), shown(value)
    return None


def check_resume(args, resume):
    """--resume continues only the run it finds: the same training flags and base model."""
    diff = first_difference(resume["args"], resume.get("inputs"), args)
    if diff:
        key, theirs, mine = diff
        raise UserError(f"--resume: --{key} is {mine} but the interrupted run used {theirs}")


def check_save_path(args):
    """Refuse a --save_path that holds another run (other training flags, an unfinished run,
    or files that record no flags), naming it and the ways out; --overwrite accepts it. Returns
    the run files that will be replaced (or removed, under --overwrite)."""
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
    flags, inputs, progress = _recorded_run(p)
    if flags is None:
        raise UserError(f"--save_path {p} holds the files of a run ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''}) that record no flags: give another --save_path, "
                        f"or add --overwrite to delete them first")
    diff = first_difference(flags, inputs, args)
    if diff:
        key, theirs, mine = diff
        raise UserError(f"--save_path {p} holds another run ({_describe_run(flags)}; it used --{key} "
                        f"{theirs}, not {mine}): {ways}")
    if progress is None:   # finished means: resume.pkl says so, written after the final files
        raise UserError(f"--save_path {p} holds an unfinished run with these flags whose {RESUME_FILE} is missing "
                        f"or unreadable, so it cannot be continued: add --overwrite to start it again, or give "
                        f"another --save_path")
    if progress.get("phase") != 3:
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
    kept = sorted(set(os.listdir(save_path)) - {LOCK_FILE})
    print(f"--overwrite: deleted {len(files)} files of the previous run in {save_path}"
          + (f"; kept {', '.join(kept)} (not written by run_exp.py)" if kept else ""))


def prepare_save_path(args):
    """Once every input is checked: create and lock --save_path (utils.lock_dir), refuse or clear
    what it holds (check_save_path, clear_run; nothing for --resume), and say when no trained
    network will be kept."""
    from utils import check_writable_dir, lock_dir
    check_writable_dir(args.save_path)  # every input is checked before anything is written
    lock_dir(args.save_path)   # one process per --save_path, from before it is looked at to the end
    replaced = [] if args.resume else check_save_path(args)
    if args.overwrite and replaced:
        clear_run(args.save_path, replaced)
    elif replaced:
        print(f"note: {args.save_path} holds a finished run with the same flags: its files are replaced")
    if not args.save_models:
        print("note: without --save_models no parameters_final.pkl is written"
              + (" (only the --constant_save checkpoints)" if args.constant_save or args.constant_save_linear else
                 ": add it to keep the trained network"))


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
    validate(args)  # before JAX loads: a bad flag answers at once
    import experiment
    import utils
    try:
        return _run(args, experiment)
    finally:
        utils.unlock_dir(args.save_path)   # lock_dir in prepare_save_path


def _run(args, experiment):
    resume = None
    if args.resume:
        resume = experiment.load_resume(os.path.join(args.save_path, RESUME_FILE), args.save_path)
        check_resume(args, resume)
    exp = experiment.Run(args, prepare_save_path, resume_file=RESUME_FILE, resume=resume, fractions=FRACTIONAL_EPOCHS)
    state, theta0, progress = experiment.initial_state(exp)
    results = progress["results"]
    if progress["phase"] == 3:
        print(f"the run in {args.save_path} had already finished")
        print_results(results, args)
        return results
    if exp.resume is not None:
        print(f"resuming phase {progress['phase']} at epoch {progress['epoch']}")
    t_start = time.time()
    experiment.run_phases(exp, state, theta0, progress)
    print(f"done in {time.time() - t_start:.1f}s")
    print_results(results, args)
    final = os.path.join(args.save_path, "parameters_final.pkl")
    if not args.save_models and (args.constant_save and args.standard_epochs and not args.base_model_path
                                 or args.constant_save_linear and args.linear_epochs):
        print(f"{final} was not written (add --save_models to write it); the constant saves are in {args.save_path}")
    elif not args.save_models:
        print(f"no checkpoint was written: add --save_models to write {final}")
    return results


def interrupted(args):
    """The line for Ctrl-C / SIGTERM: where the run's resume record stands, and how to continue."""
    _, _, progress = _recorded_run(args.save_path)
    if not progress or progress.get("phase") == 3:
        return None
    return (f"phase {progress.get('phase')} stopped at epoch {progress.get('epoch')} (the last completed epoch is "
            f"saved); continue with the same command and --resume")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(run, args, on_interrupt=lambda: interrupted(args))


if __name__ == "__main__":
    main()
