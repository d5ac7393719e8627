"""Phase-1 and phase-2 training of Loo et al. (2022), standard or adversarial, in standard,
linearized or centered dynamics. This script parses and checks the flags, guards --save_path
(run_folder.py) and calls experiment.py, which trains. See docs/scripts.md for the flags and the
files written."""
from __future__ import annotations

import os
import sys
import time

import cli
from run_folder import RESUME_FILE, check_resume, prepare_save_path, recorded_run
from utils import UserError, run_main

FRACTIONAL_EPOCHS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.5, 2.5)
EXAMPLES = [
    "python run_exp.py --dataset digits --model resnet18 --width 8 --loaders AC --standard_epochs 20 "
    "--linear_epochs 0 --eps 32 --constant_save --save_models --save_path runs/phase1_AC",
    "python run_exp.py --base_model_path runs/phase1_AC/parameters_checkpoint_10.pkl --dataset digits "
    "--linear_epochs 10 --centering --loaders CC --save_models --save_path runs/phase2_centered",
    "# Tsilivis & Kempe's recipe (PGD-20 adversarial training of CNN_mega; --train_attack fgsm for their FGSM "
    "run, --loaders CC for the clean one):",
    "python run_exp.py --dataset mnist --model cnn_mega --loaders AC --adv_only --eps 8 --train_steps 20 "
    "--train_step_size 2 --no_train_random_start --clip_at_end --lr 0.01 --momentum 0 --lr_schedule constant --batch_size 250 "
    "--standard_epochs 200 --linear_epochs 0 --constant_save --save_models --save_path runs/tk_pgd",
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
    g.add_argument("--lr", type=float, default=0.1,
                   help="phase-1 learning rate (SGD, momentum 0.9), x0.1 after epoch 100 and x0.01 after epoch 150 "
                        "(the reference's 0.1)")
    g.add_argument("--second_lr", type=float, default=0.01, help="phase-2 learning rate (SGD, momentum 0.9)")
    g = p.add_argument_group("training recipe (beyond the reference; the defaults are the reference's)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum of both phases (0: plain SGD, Tsilivis & Kempe's)")
    g.add_argument("--lr_schedule", choices=cli.LR_SCHEDULES, default="reference",
                   help="phase-1 learning rate: 'reference' (x0.1 after epoch 100, x0.01 after 150) or 'constant'")
    g.add_argument("--adv_only", action="store_true",
                   help="an adversarial batch is one step, on the attack's examples only (Tsilivis & Kempe); "
                        "without it, the reference's clean step and then the adversarial step")
    g.add_argument("--train_attack", choices=("pgd", "fgsm"), default="pgd",
                   help="attack of the adversarial loaders: L-inf PGD (--train_steps, --train_step_size, random "
                        "start), or FGSM: one step of --eps from the clean image")
    g.add_argument("--train_steps", type=cli.positive_int, default=20, help="steps of the training PGD")
    g.add_argument("--train_step_size", type=float, default=None,
                   help="step of the training PGD in 1/255 units (default: 2 eps / --train_steps, the reference's)")
    g.add_argument("--no_train_random_start", action="store_true",
                   help="the training PGD starts at the clean image (Tsilivis & Kempe), not at a random point "
                        "of the eps-ball")
    g.add_argument("--clip_at_end", action="store_true",
                   help="the training PGD clips to [0, 1] only its final images, its iterates only to the eps-ball "
                        "(Tsilivis & Kempe's pgd_attack); without it every iterate is clipped (Madry et al.)")
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
    g = p.add_argument_group("Tsilivis & Kempe's networks (--model fc, conv or myrtle; --width is their hidden width)")
    cli.add_architecture_shape(g)
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
    for flag in ("lr", "second_lr"):
        if not 0 <= getattr(args, flag) < float("inf"):
            raise UserError(f"--{flag} must be finite and >= 0 (got {getattr(args, flag)})")
    for flag in ("train_size", "test_size"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag} must be positive (got {getattr(args, flag)})")
    for flag in ("standard_epochs", "linear_epochs", "flip_epoch"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    if not 0 <= args.momentum < 1:   # also refuses nan
        raise UserError(f"--momentum must lie in [0, 1) (got {args.momentum})")
    if args.train_step_size is not None and not 0 < args.train_step_size <= 255:
        raise UserError(f"--train_step_size is in 1/255 units and must lie in (0, 255] (got {args.train_step_size})")
    if args.train_attack == "fgsm":
        given = [f for f, changed in (("train_steps", args.train_steps != 20), ("train_step_size",
                 args.train_step_size is not None), ("no_train_random_start", args.no_train_random_start), ("clip_at_end", args.clip_at_end)) if changed]
        if given:
            raise UserError(f"--{given[0]} is for --train_attack pgd: FGSM is one step of --eps from the clean image")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive (got {args.batch_size})")
    cli.check_attack_args(args, "pgd_eval_steps")
    if args.width is not None and args.width <= 0:
        raise UserError(f"--width must be positive (got {args.width})")
    given = cli.architecture_flags_given(args)
    if args.model in cli.ARCHITECTURES:
        cli.architecture_record(args.model, args)
    elif given and not args.base_model_path:
        raise UserError(f"--{given[0]} is for --model fc, conv or myrtle (Tsilivis & Kempe's networks)")
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
    for flag in cli.architecture_flags_given(args) if args.base_model_path else []:
        yield f"--{flag} is ignored with --base_model_path: the checkpoint records its network"
    if "A" not in args.loaders and "F" not in args.loaders:
        for flag in ("adv_only", "train_attack", "train_steps", "train_step_size", "no_train_random_start",
                     "clip_at_end"):
            if getattr(args, flag) != default(flag):
                yield f"--{flag} is ignored with --loaders {args.loaders}: no batch is adversarial"
    if args.constant_save and (args.standard_epochs == 0 or args.base_model_path):
        yield "--constant_save is ignored without phase-1 epochs: there is nothing to save"


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
    _, _, progress = recorded_run(args.save_path)
    if not progress or progress.get("phase") == 3:
        return None
    return (f"phase {progress.get('phase')} stopped at epoch {progress.get('epoch')} (the last completed epoch is "
            f"saved); continue with the same command and --resume")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(run, args, on_interrupt=lambda: interrupted(args))


if __name__ == "__main__":
    main()
