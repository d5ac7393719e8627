"""Loo et al.'s central experiment in one command: robustness of phase 2 against the epoch of the
kernel it is trained on.

For every seed: phase 1 trains a network benignly (CC) and adversarially (AC) with --constant_save;
from each run's checkpoint at every chosen kernel epoch e, phase 2 trains the centered model
J(theta_e)(theta - theta_e) on the frozen kernel of theta_e, with benign (CC) and with adversarial
(CA) data, and evaluates it (clean, L-inf PGD, L2 PGD: run_exp.py's own phase-2 evaluation);
`analyze_ntk.py dynamics` measures how far each phase-1 run's kernel still is from its final one.
A report directory then holds the table, the figure and the exact commands.

Every cell of the grid (a phase-1 run, a phase-2 run, a kernel-motion analysis) is its own
directory under --out_dir and is skipped when complete, so a killed grid resumes where it
stopped and a new kernel epoch or seed only runs the new cells:

  OUT/phase1/{CC,AC}_s{seed}/                   run_exp.py phase 1 (constant saves)
  OUT/phase2/{CC,AC}_s{seed}/e{e}_{CC,CA}/      run_exp.py phase 2 from parameters_checkpoint_{e}.pkl
  OUT/dynamics/s{seed}/                         analyze_ntk.py dynamics on both phase-1 runs
  OUT/report/                                   report.md, grid.png, results.json, results.csv, commands.sh

Its parts: grid_cells.py (the presets, the cells, their commands and when a cell is complete),
grid_scheduler.py (running the cells, in this process or in worker processes) and grid_report.py
(the report). This script parses the flags, checks them before any run starts, and runs the grid.
"""
from __future__ import annotations

import math
import shlex

import cli
import utils
from grid_cells import PRESETS, SETTINGS, add_execution_args, check_data, epoch_name, grid_flags, make_cells, print_commands, script_path
from grid_report import write_report
from grid_scheduler import run_experiment
from utils import UserError

EXAMPLES = [
    "python kernel_epoch_grid.py --preset digits --jobs 2 --out_dir grid_digits",
    "python kernel_epoch_grid.py --preset digits --kernel_epochs 0 0.5 2 5 10 15 20 --out_dir grid_digits "
    "--jobs 2   # adds epoch 15: only its cells run",
    "python kernel_epoch_grid.py --preset cifar-subset --data_dir ./data --jobs 2 --out_dir grid_cifar",
    "python kernel_epoch_grid.py --preset paper --data_dir ./data --out_dir grid_paper --print_commands "
    "> cells.sh   # one line per cell, for a job array",
]


def build_parser():
    p = cli.parser("Loo et al.'s central experiment: phase-1 benign (CC) and adversarial (AC) runs with "
                   "constant saves; from each chosen kernel epoch, phase 2 in centered dynamics with benign "
                   "(CC) and adversarial (CA) data; clean, L-inf and L2 PGD accuracy against the kernel epoch, "
                   "beside the kernel's motion (analyze_ntk.py dynamics); a report with table, figure and the "
                   "exact commands. Flags left unset take the preset's value.", EXAMPLES)
    g = p.add_argument_group("grid")
    g.add_argument("--preset", default="digits",
                   help=f"sizes and settings: {', '.join(PRESETS)} (docs/reproducing.md)")
    g.add_argument("--out_dir", default=None,
                   help="directory of the grid: one sub-directory per cell, and report/ (default: grid_{preset})")
    g.add_argument("--kernel_epochs", type=float, nargs="+", default=None,
                   help="phase-1 epochs whose checkpoint is the kernel of phase 2: integers up to "
                        "--phase1_epochs, or a fraction run_exp.py --constant_save writes (0.125, 0.25, 0.375, "
                        "0.5, 0.75, 1.5, 2.5)")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="--random_seed of every run; each seed is a full replicate (its own phase-1 runs)")
    g = p.add_argument_group("runs (default: the preset's)")
    g.add_argument("--dataset", default=None, choices=cli.DATASETS, help="dataset")
    g.add_argument("--model", default=None, choices=cli.MODELS, help="network")
    g.add_argument("--width", type=int, default=None, help="ResNet channel width")
    g.add_argument("--data_dir", default="./data",
                   help="folder holding the CIFAR files in torchvision's layout (must already hold them: "
                        "the grid does not download)")
    g.add_argument("--eps", type=float, default=None,
                   help="L-inf radius in 1/255 units: adversarial training and the L-inf evaluation")
    g.add_argument("--phase1_epochs", type=int, default=None, help="phase-1 epochs (run_exp.py --standard_epochs)")
    g.add_argument("--phase2_epochs", type=int, default=None, help="phase-2 epochs (run_exp.py --linear_epochs)")
    g.add_argument("--second_lr", type=float, default=None, help="phase-2 learning rate")
    g.add_argument("--pgd_eval_steps", type=int, default=None, help="steps of the L-inf and L2 evaluation attacks")
    g.add_argument("--train_size", type=int, default=None,
                   help="train on a seeded class-balanced subset of this many images (0: all)")
    g.add_argument("--test_size", type=int, default=None,
                   help="evaluate on a seeded class-balanced subset of this many test images (0: all)")
    g.add_argument("--batch_size", type=int, default=None, help="training batch size")
    g.add_argument("--dynamics_size", type=int, default=None,
                   help="training images of the kernels of analyze_ntk.py dynamics (analyze_ntk --dataset_size)")
    g = p.add_argument_group("execution")
    add_execution_args(g, "phase-1 runs", "phase2/AC_s0/e2_CA")
    return p


def resolve(args):
    """The grid's settings: the preset's, overridden by every flag given. Checked here, before
    any run starts (UserError on bad input)."""
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    grid = dict(PRESETS[args.preset])
    for key in SETTINGS:
        value = getattr(args, key, None)
        if value is not None:
            grid[key] = value
    for key in ("train_size", "test_size"):
        if grid[key] == 0:
            grid[key] = None
    grid["data_dir"] = args.data_dir
    grid["preset"] = args.preset
    grid["out_dir"] = args.out_dir or f"grid_{args.preset}"
    for key in ("width", "phase1_epochs", "phase2_epochs", "pgd_eval_steps", "batch_size", "dynamics_size"):
        if grid[key] <= 0:
            raise UserError(f"--{key} must be positive (got {grid[key]})")
    for key in ("train_size", "test_size"):
        if grid[key] is not None and grid[key] < 0:
            raise UserError(f"--{key} must be >= 0 (got {grid[key]})")
    if not (grid["eps"] >= 0 and math.isfinite(grid["eps"])):
        raise UserError(f"--eps must be finite and >= 0 (got {grid['eps']})")
    if not (grid["second_lr"] > 0 and math.isfinite(grid["second_lr"])):
        raise UserError(f"--second_lr must be finite and > 0 (got {grid['second_lr']})")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
    grid["kernel_epochs"] = sorted({float(e) for e in grid["kernel_epochs"]})
    grid["seeds"] = sorted(set(grid["seeds"]))
    check_kernel_epochs(grid["kernel_epochs"], grid["phase1_epochs"])
    check_data(grid, {key: grid[key] for key in ("train_size", "test_size", "dynamics_size")})
    return grid


def saved_epochs(phase1_epochs):
    """The epochs run_exp.py --constant_save writes a checkpoint for in a run of this length."""
    from run_exp import FRACTIONAL_EPOCHS
    return sorted(set(range(phase1_epochs + 1)) | {f for f in FRACTIONAL_EPOCHS if f < phase1_epochs})


def check_kernel_epochs(epochs, phase1_epochs):
    saved = saved_epochs(phase1_epochs)
    for e in epochs:
        if e not in saved:
            fractions = ", ".join(epoch_name(f) for f in saved if f != int(f))
            raise UserError(f"--kernel_epochs {epoch_name(e)}: phase 1 of {phase1_epochs} epochs saves no checkpoint "
                            f"at that epoch; choose integers 0..{phase1_epochs} or one of {fractions}")


def run(args):
    """Run (or print, or report on) the grid. Returns {'report': path or None, 'failed': [...],
    'ran': [cell names]}."""
    grid = resolve(args)
    cells = make_cells(grid)
    grid_command = shlex.join(["python", script_path(), *grid_flags(grid)])
    if args.print_commands:
        print_commands(grid, cells)
        return {"report": None, "failed": [], "ran": []}
    return run_experiment(grid["out_dir"], cells, args, lambda markers: write_report(grid, cells, markers, grid_command))


def main(argv=None):
    # This process only checks, schedules and reports: the cells load JAX where they run.
    return utils.run_main(run, build_parser().parse_args(argv), uses_jax=False,
                          on_interrupt=lambda: "the complete cells are kept; rerun the same command to run the others")


if __name__ == "__main__":
    main()
