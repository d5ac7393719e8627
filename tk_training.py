"""Tsilivis & Kempe's training experiment in one command: clean, FGSM and PGD adversarial training
of the same network from the same seed (their robust_train_CNN.py recipe: CNN_mega, plain SGD,
adversarial images only), the full empirical NTK (every class pair, C n x C n) of every
checkpoint on one fixed batch of training images, and a report overlaying the three runs'
kernel motion (their measurements.py) with the paper's claims checked.

  OUT/train/{clean,fgsm,pgd}/   run_exp.py with the recipe (a checkpoint at every epoch)
  OUT/dynamics/                 analyze_ntk.py dynamics --full on the three runs
  OUT/report/                   report.md, results.json, commands.sh (the figures are dynamics/'s)

Every run is a cell, skipped when complete (a killed experiment resumes where it stopped); the
cells run through kernel_epoch_grid.py's machinery (grid_cells.py, grid_scheduler.py).
"""
from __future__ import annotations

import os
import shlex

import cli
import utils
from grid_cells import Cell, add_execution_args, check_data, data_flags, print_cell_commands, read_json, script_path
from grid_report import fmt
from grid_scheduler import run_experiment
from utils import UserError

EXAMPLES = [
    "python tk_training.py --preset digits --jobs 2 --out_dir tk_training_digits",
    "python tk_training.py --preset mnist --data_dir ./data --out_dir tk_training_mnist",
    "python tk_training.py --preset cifar10 --data_dir ./data --out_dir tk_training_cifar10 --print_commands > cells.sh",
]

RUNS = ("clean", "fgsm", "pgd")
# eps and pgd_step are in 1/255 units. kernel_size: the fixed batch of the full kernels;
# max_epoch: the last epoch whose kernel is measured (theirs: the first 50 kernels).
PRESETS = {
    # Offline, 8x8 images, on a CPU (12 min with --jobs 2 on 2 cores). eps 32/255 because digits'
    # pixels come in steps of 1/16; batch 50 and lr 0.1 because at their batch 250 and lr 0.01 (6
    # steps per epoch here, 240 on MNIST) CNN_mega does not leave chance in 40 epochs.
    "digits": dict(dataset="digits", model="cnn_mega", width=16, epochs=60, lr=0.1, batch_size=50, eps=32.0,
                   pgd_steps=20, pgd_step=8.0, kernel_size=100, k=20, max_epoch=60, train_size=0, test_size=0,
                   pgd_eval_steps=20, seed=0),
    # Their setting (robust_train_CNN.py): GPU scale.
    "mnist": dict(dataset="mnist", model="cnn_mega", width=32, epochs=200, lr=0.01, batch_size=250, eps=8.0,
                  pgd_steps=20, pgd_step=2.0, kernel_size=250, k=20, max_epoch=49, train_size=0, test_size=0,
                  pgd_eval_steps=20, seed=0),
    "cifar10": dict(dataset="cifar10", model="cnn_mega", width=32, epochs=200, lr=0.01, batch_size=250, eps=8.0,
                    pgd_steps=20, pgd_step=2.0, kernel_size=250, k=20, max_epoch=49, train_size=0, test_size=0,
                    pgd_eval_steps=20, seed=0),
}
SETTINGS = tuple(PRESETS["digits"])


def labels(grid):
    """Each run's label in the dynamics figures and the report."""
    return {"clean": "clean", "fgsm": "FGSM", "pgd": f"PGD-{grid['pgd_steps']}"}


def build_parser():
    p = cli.parser("Tsilivis & Kempe's training experiment: clean, FGSM and PGD adversarial training of one network "
                   "from one seed, the full empirical NTK (all class pairs) of every checkpoint on one fixed batch, "
                   "and a report overlaying the three runs' kernel motion with the paper's claims checked. Flags left "
                   "unset take the preset's value.", EXAMPLES)
    g = p.add_argument_group("experiment")
    g.add_argument("--preset", default="digits", help=f"sizes and settings: {', '.join(PRESETS)}")
    g.add_argument("--out_dir", default=None, help="directory of the experiment (default: tk_training_{preset})")
    g.add_argument("--dataset", default=None, choices=cli.DATASETS, help="dataset")
    g.add_argument("--data_dir", default="./data",
                   help="folder holding the dataset's files in torchvision's layout (must already hold them: the "
                        "experiment does not download; run_exp.py --dataset NAME does)")
    g.add_argument("--model", default=None, choices=cli.MODELS, help="network of the three runs")
    g.add_argument("--width", type=int, default=None, help="its width (cnn_mega: the first conv's channels; theirs 32)")
    g.add_argument("--seed", type=cli.seed, default=None, help="--random_seed of every run (init, order, images)")
    g = p.add_argument_group("training (run_exp.py: plain SGD, constant lr, adversarial images only)")
    g.add_argument("--epochs", type=int, default=None, help="training epochs of each run")
    g.add_argument("--lr", type=float, default=None, help="learning rate (theirs: 0.01)")
    g.add_argument("--batch_size", type=int, default=None, help="training batch size (theirs: 250)")
    g.add_argument("--eps", type=float, default=None, help="L-inf radius in 1/255 units (theirs: 8)")
    g.add_argument("--pgd_steps", type=int, default=None, help="steps of the PGD run's attack (theirs: 20)")
    g.add_argument("--pgd_step", type=float, default=None, help="its step in 1/255 units (theirs: 2)")
    g.add_argument("--train_size", type=int, default=None, help="class-balanced training subset (0: all)")
    g.add_argument("--test_size", type=int, default=None, help="class-balanced test subset of the evaluation (0: all)")
    g.add_argument("--pgd_eval_steps", type=int, default=None, help="steps of the evaluation attacks")
    g = p.add_argument_group("kernels (analyze_ntk.py dynamics --full)")
    g.add_argument("--kernel_size", type=int, default=None,
                   help="the fixed class-balanced batch of training images of every full kernel (theirs: 250)")
    g.add_argument("--k", type=int, default=None, help="the top-k eigenspace; the bottom space is all but it (theirs: 20)")
    g.add_argument("--max_epoch", type=float, default=None,
                   help="the kernels of the checkpoints up to this epoch are measured (theirs: 49)")
    g = p.add_argument_group("execution")
    add_execution_args(g, "the training runs", "train/pgd")
    return p


def resolve(args):
    """The preset overridden by every flag given, checked before any run starts."""
    import data
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    grid = dict(PRESETS[args.preset])
    for key in SETTINGS:
        if getattr(args, key, None) is not None:
            grid[key] = getattr(args, key)
    grid.update(preset=args.preset, data_dir=args.data_dir, out_dir=args.out_dir or f"tk_training_{args.preset}")
    for key in ("width", "epochs", "batch_size", "pgd_steps", "kernel_size", "k", "pgd_eval_steps"):
        if grid[key] <= 0:
            raise UserError(f"--{key} must be positive (got {grid[key]})")
    for key in ("train_size", "test_size", "max_epoch"):
        if grid[key] < 0:
            raise UserError(f"--{key} must be >= 0 (got {grid[key]})")
    for key in ("lr", "eps", "pgd_step"):
        if not 0 < grid[key] < float("inf"):
            raise UserError(f"--{key} must be finite and > 0 (got {grid[key]})")
    cli.check_eps(grid["eps"])
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
    n = data.num_classes_of(grid["dataset"]) * grid["kernel_size"]
    if grid["k"] >= n:
        raise UserError(f"--k {grid['k']} leaves no bottom space in a full kernel of {n} rows (C x --kernel_size)")
    check_data(grid, {key: grid[key] for key in ("train_size", "test_size", "kernel_size")},
               on_disk=not args.print_commands)   # the commands may be printed on another machine than they run on
    return grid


def training_flags(grid, run):
    """run_exp.py's flags of one run: the recipe, then what makes it clean, FGSM or PGD."""
    argv = ["--dataset", grid["dataset"], *data_flags(grid), "--model", grid["model"], "--width", str(grid["width"]),
            "--standard_epochs", str(grid["epochs"]), "--linear_epochs", "0", "--lr", f"{grid['lr']:g}",
            "--momentum", "0", "--lr_schedule", "constant", "--batch_size", str(grid["batch_size"]),
            "--eps", f"{grid['eps']:g}", "--pgd_eval_steps", str(grid["pgd_eval_steps"])]
    for key in ("train_size", "test_size"):
        if grid[key]:
            argv += [f"--{key}", str(grid[key])]
    if run == "clean":
        argv += ["--loaders", "CC"]
    elif run == "fgsm":
        argv += ["--loaders", "AC", "--adv_only", "--train_attack", "fgsm"]
    else:
        argv += ["--loaders", "AC", "--adv_only", "--train_steps", str(grid["pgd_steps"]),
                 "--train_step_size", f"{grid['pgd_step']:g}", "--no_train_random_start", "--clip_at_end"]
    return argv + ["--constant_save", "--save_models", "--random_seed", str(grid["seed"])]


def make_cells(grid):
    out = grid["out_dir"]
    cells = [Cell(f"train/{run}", "tk:train", "run_exp",
                  training_flags(grid, run) + ["--no_progress", "--save_path", os.path.join(out, "train", run)],
                  [], out, run=run, weight=3 if run == "pgd" else 1)
             for run in RUNS]
    cells.append(Cell("dynamics", "tk:full_dynamics", "analyze_ntk",
                      ["dynamics", "--full", "--runs", *[os.path.join(out, "train", r) for r in RUNS],
                       "--labels", *labels(grid).values(), "--dataset_size", str(grid["kernel_size"]),
                       "--k", str(grid["k"]), "--max_epoch", f"{grid['max_epoch']:g}",
                       "--random_seed", str(grid["seed"]), *data_flags(grid),
                       "--out_dir", os.path.join(out, "dynamics"), "--no_progress"],
                      [f"train/{r}" for r in RUNS], out))
    return cells


def experiment_flags(grid):
    argv = ["--preset", grid["preset"], "--out_dir", grid["out_dir"]]
    for key in SETTINGS:
        argv += [f"--{key}", f"{grid[key]:g}" if isinstance(grid[key], float) else str(grid[key])]
    return argv + data_flags(grid)


# ======================================================================================
# The report
# ======================================================================================
def lazy_epochs(motion, fraction):
    """The first epoch at which the full kernel has covered `fraction` of its final distance to
    K_0 (polar radius), or None."""
    return next((e for e, r in zip(motion["epochs"], motion["polar"]["full"]["radius"]) if r >= fraction), None)


def summarize(motion, results):
    """The numbers the report compares, of one run."""
    return {"half_radius_epoch": lazy_epochs(motion, 0.5), "radius_90_epoch": lazy_epochs(motion, 0.9),
            "final_distance_to_init": motion["distance_to_init"][-1],
            "late_velocity": _late_velocity(motion),
            "mass_top10": motion["mass"]["top10"][-1], "mass_top20": motion["mass"]["top20"][-1],
            "mass_top10_start": motion["mass"]["top10"][0],
            "epochs": [motion["epochs"][0], motion["epochs"][-1]],
            "accuracy": None if results is None else results.get("standard")}


def _late_velocity(motion):
    """The mean kernel distance per epoch over the last half of the measured epochs."""
    e, v = motion["epochs"], motion["velocity"]
    late = [x for t, x in enumerate(v) if x is not None and e[t] >= e[-1] / 2]
    return sum(late) / len(late) if late else None


def claims(s):
    """(claim, criterion, numbers, holds) rows; s: run (clean, fgsm, pgd) -> summarize()."""
    rows = []
    if not all(r in s for r in RUNS):
        return rows
    c, f, p = (s[r] for r in RUNS)
    ok = None not in (c["half_radius_epoch"], f["half_radius_epoch"], p["half_radius_epoch"])
    rows.append(("Under adversarial training the NTK falls into the lazy regime earlier",
                 "the adversarial runs' kernels cover half of their final distance to K_0 at an earlier epoch than "
                 "the clean run's",
                 f"half-radius epoch: clean {fmt(c['half_radius_epoch'], 'g')}, FGSM {fmt(f['half_radius_epoch'], 'g')}, "
                 f"PGD {fmt(p['half_radius_epoch'], 'g')}; 90%: clean {fmt(c['radius_90_epoch'], 'g')}, FGSM "
                 f"{fmt(f['radius_90_epoch'], 'g')}, PGD {fmt(p['radius_90_epoch'], 'g')}",
                 ok and f["half_radius_epoch"] < c["half_radius_epoch"] and p["half_radius_epoch"] < c["half_radius_epoch"]))
    ok = None not in (c["late_velocity"], f["late_velocity"], p["late_velocity"])
    rows.append(("... and moves less late in training",
                 "mean kernel distance per epoch over the second half of the measured epochs: adversarial below clean",
                 f"clean {fmt(c['late_velocity'], '.2e')}, FGSM {fmt(f['late_velocity'], '.2e')}, PGD "
                 f"{fmt(p['late_velocity'], '.2e')}",
                 ok and f["late_velocity"] < c["late_velocity"] and p["late_velocity"] < c["late_velocity"]))
    rows.append(("Adversarial training puts more of the kernel's mass on its top eigenspace",
                 "share of sum lambda^2 in the top 10 (and top 20) eigenvalues at the last measured epoch: adversarial "
                 "above clean",
                 f"top-10: clean {fmt(c['mass_top10'])}, FGSM {fmt(f['mass_top10'])}, PGD {fmt(p['mass_top10'])} "
                 f"(at init {fmt(c['mass_top10_start'])}); top-20: clean {fmt(c['mass_top20'])}, FGSM "
                 f"{fmt(f['mass_top20'])}, PGD {fmt(p['mass_top20'])}",
                 f["mass_top10"] > c["mass_top10"] and p["mass_top10"] > c["mass_top10"]))
    return rows


def write_report(grid, cells, markers, command):
    """report/: report.md, results.json, commands.sh. Returns report.md's path."""
    import data
    out = grid["out_dir"]
    rdir = os.path.join(out, "report")
    os.makedirs(rdir, exist_ok=True)
    missing = [c.name for c in cells if c.name not in markers]
    label = labels(grid)
    accuracy = {r: read_json(os.path.join(out, "train", r, "results.json")) for r in RUNS if f"train/{r}" in markers}
    dyn = read_json(os.path.join(out, "dynamics", "dynamics.json")) if "dynamics" in markers else None
    summary = {r: summarize(dyn["runs"][label[r]], accuracy.get(r)) for r in RUNS} if dyn else {}
    rows = claims(summary)
    utils.atomic_json(os.path.join(rdir, "results.json"),
                      {"settings": grid, "summary": summary, "missing": missing,
                       "claims": [{"claim": a, "criterion": b, "numbers": n, "holds": h} for a, b, n, h in rows]})
    commands = ["#!/usr/bin/env bash", "# The exact runs of this experiment, from the repository root, in dependency "
                "order.", "set -euo pipefail"] + [c.command() for c in cells]
    utils.atomic_write_bytes(os.path.join(rdir, "commands.sh"), ("\n".join(commands) + "\n").encode())

    g = grid
    n_classes = data.num_classes_of(g["dataset"])
    md = [f"# Tsilivis & Kempe's training experiment ({g['preset']})", ""]
    if missing:
        md += [f"**Incomplete: {len(missing)} of {len(cells)} cells are missing** ({', '.join(missing)}); their "
               f"numbers read n/a.", ""]
    md += ["## Settings", "",
           f"- {g['model']} (width {g['width']}) on {g['dataset']} "
           f"({'all' if not g['train_size'] else g['train_size']} training images), seed {g['seed']}, {g['epochs']} "
           f"epochs of plain SGD (lr {g['lr']:g}, no momentum, batch {g['batch_size']}, constant rate)",
           f"- clean; FGSM (one step of eps = {g['eps']:g}/255 from the clean image); PGD-{g['pgd_steps']} (steps of "
           f"{g['pgd_step']:g}/255, no random start, iterates clipped to [0, 1] at the end); the adversarial runs "
           f"train on the attack's images only",
           f"- full empirical NTK (all {n_classes} x {n_classes} class pairs) on one fixed class-balanced batch of "
           f"{g['kernel_size']} training images, read as a {n_classes * g['kernel_size']} x "
           f"{n_classes * g['kernel_size']} matrix (class-major, as "
           f"theirs), at every checkpoint up to epoch {g['max_epoch']:g}; top-{g['k']} eigenspace and the rest",
           "", "Command:", "", f"    {command}", "",
           "## Accuracy at the end of training (test set; L-inf PGD at the training eps)", "",
           "| run | clean | L-inf PGD |", "|---|---|---|"]
    for r in RUNS:
        acc = (accuracy.get(r) or {}).get("standard") or {}
        md.append(f"| {label[r]} | {fmt(acc.get('clean'))} | {fmt(acc.get('linf'))} |")
    md += ["", "## The paper's claims and what this run shows", "",
           "| claim | criterion | this run | holds |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {n} | {'yes' if h else 'no'} |" for a, b, n, h in rows] or ["| n/a | | | |"]
    md += ["", "## Kernel motion per run", "", "| run | epochs | d(K_0, K_T) | half-radius epoch | top-10 mass (start -> end) |",
           "|---|---|---|---|---|"]
    for r, s in summary.items():
        md.append(f"| {label[r]} | {s['epochs'][0]:g}..{s['epochs'][1]:g} | {fmt(s['final_distance_to_init'])} | "
                  f"{fmt(s['half_radius_epoch'], 'g')} | {fmt(s['mass_top10_start'])} -> {fmt(s['mass_top10'])} |")
    if dyn:
        md += ["", "## Figures (the three runs overlaid)", ""]
        for path in dyn["figures"]:
            rel = os.path.relpath(os.path.join(out, "dynamics", os.path.basename(path)), rdir)
            md.append(f"![{os.path.basename(path)}]({rel})")
    md += ["", "Their kernels after epoch 0 are taken on the PGD images of their first training batch, made against "
           "the current parameters; these are taken on the same clean images at every checkpoint, so the motion "
           "measured is the kernel's alone.", ""]
    path = os.path.join(rdir, "report.md")
    utils.atomic_write_bytes(path, "\n".join(md).encode())
    return path


def run(args):
    """Run (or print, or report on) the experiment. Returns {'report', 'failed', 'ran'}."""
    grid = resolve(args)
    cells = make_cells(grid)
    if args.print_commands:
        print_cell_commands(["python", script_path("tk_training.py"), *experiment_flags(grid)], cells,
                            (("train", "the three training runs"),
                             ("dynamics", "their full kernels' motion (needs the three runs)")))
        return {"report": None, "failed": [], "ran": []}
    command = shlex.join(["python", script_path("tk_training.py"), *experiment_flags(grid)])
    return run_experiment(grid["out_dir"], cells, args, lambda markers: write_report(grid, cells, markers, command))


def main(argv=None):
    return utils.run_main(run, build_parser().parse_args(argv), uses_jax=False,
                          on_interrupt=lambda: "the complete cells are kept; rerun the same command to run the others")


if __name__ == "__main__":
    main()
