"""Tsilivis & Kempe's experiments on infinite-width kernels in one command: training-free features
and attacks of each architecture's analytic NTK, and their transfer to finite networks of the same
architecture trained lazily.

For every task (binary: two classes, the notebook's airplane/automobile; all: every class) and
every architecture (fc1 = FC depth 1, fc2, conv2, myrtle5, ...):
  - the kernel predictor f(x) = K(x,X) K(X,X)^-1 Y of the architecture's infinite-width NTK
    (ridgeless, float64), its eigen-features and the accuracy of each under FGSM on itself
    (analyze_ntk.py features: the notebook's pipeline);
  - the predictor's FGSM and PGD examples (the notebook's PGD: a fixed step, no random start), and
    the accuracy on them of finite networks of the architecture at each --widths, trained by
    run_exp.py with a small learning rate (analyze_ntk.py attack --transfer_to);
and, per architecture, how far each finite network's empirical NTK moved while it trained
(analyze_ntk.py dynamics): wider should be lazier.

Every run is a cell, its own directory under --out_dir, skipped when complete (a killed
experiment resumes; a new architecture only runs its cells):

  OUT/finite/{arch}_w{W}/                 run_exp.py --model fc|conv|myrtle (constant saves)
  OUT/motion/{arch}/                      analyze_ntk.py dynamics on that architecture's finite runs
  OUT/kernel/{task}/{arch}/features/      analyze_ntk.py features --arch
  OUT/kernel/{task}/{arch}/attack_fgsm/   analyze_ntk.py attack --arch --method fgsm --transfer_to ...
  OUT/kernel/{task}/{arch}/attack_pgd/    analyze_ntk.py attack --arch --method pgd --transfer_to ...
  OUT/report/                             report.md, figures, results.json, commands.sh (tk_report.py)

The cells run through kernel_epoch_grid.py's machinery (grid_cells.py: when a cell is complete;
grid_scheduler.py: --jobs worker processes).
"""
from __future__ import annotations

import os
import re
import shlex

import cli
import utils
from grid_cells import Cell, add_execution_args, check_data, data_flags, print_cell_commands, script_path
from grid_scheduler import run_experiment
from utils import UserError

EXAMPLES = [
    "python tk_experiment.py --preset digits --jobs 2 --out_dir tk_digits",
    "python tk_experiment.py --preset cifar-subset --data_dir ./data --jobs 2 --out_dir tk_cifar",
    "python tk_experiment.py --preset cifar-subset --data_dir ./data --archs fc1 conv2 --tasks binary "
    "--out_dir tk_cifar_binary",
    "python tk_experiment.py --preset paper --data_dir ./data --out_dir tk_paper --print_commands > cells.sh",
]

TASKS = ("binary", "all")
# What each preset runs. pgd_step is in 1/255 units: the notebook's 0.01 at eps 8/255 (2.55), scaled
# with eps on digits. lr is run_exp.py's phase-1 --lr of the finite networks (SGD, momentum 0.9; NTK
# parameterization, so a rate of order 1).
PRESETS = {
    # Offline, 8x8 images: 7.5 minutes on 2 CPU cores with --jobs 2. Binary: 3 vs 8 (0 vs 1 is
    # too easy to attack at this eps).
    "digits": dict(dataset="digits", archs=["fc1", "fc2", "conv2", "myrtle5"], tasks=["binary", "all"],
                   classes=[3, 8], n_train=100, n_test=40, eps=32.0, pgd_steps=10, pgd_step=10.2, n_features=8,
                   n_tail=4, widths=[32, 128], train_epochs=10, lr=0.5, train_size=0, test_size=0, batch_size=128,
                   motion_size=20, seed=0),
    # Real CIFAR-10 images: 18 minutes on 2 CPU cores with --jobs 2. Myrtle-5's kernel (and its
    # gradient for every attack) costs too much on a CPU at 32x32: it is in the paper preset.
    "cifar-subset": dict(dataset="cifar10", archs=["fc1", "fc2", "conv2"], tasks=["binary", "all"], classes=[0, 1],
                         n_train=500, n_test=100, eps=8.0, pgd_steps=10, pgd_step=2.55, n_features=10, n_tail=6,
                         widths=[32, 128], train_epochs=10, lr=0.5, train_size=1000, test_size=500, batch_size=50,
                         motion_size=20, seed=0),
    # The notebook's sizes (2000 training, 100 test images) and every architecture: GPU scale.
    "paper": dict(dataset="cifar10", archs=["fc1", "fc2", "conv2", "myrtle5"], tasks=["binary", "all"],
                  classes=[0, 1], n_train=2000, n_test=100, eps=8.0, pgd_steps=10, pgd_step=2.55, n_features=20,
                  n_tail=10, widths=[256, 2048], train_epochs=20, lr=0.5, train_size=0, test_size=0, batch_size=128,
                  motion_size=200, seed=0),
}
SETTINGS = tuple(PRESETS["digits"])
# The relative cost of an architecture's cells (scheduling only: the costliest first).
ARCH_WEIGHT = {"fc": 1, "conv": 8, "myrtle": 30}


def build_parser():
    p = cli.parser("Tsilivis & Kempe's experiments on infinite-width NTKs: per architecture and task, the "
                   "ridgeless kernel predictor's clean, FGSM and PGD accuracy, each eigen-feature's accuracy and "
                   "FGSM robustness, feature images side by side, the features' agreement across architectures, "
                   "and the transfer of the kernel's adversarial examples to finite networks trained lazily at two "
                   "widths (with how far their empirical NTK moved); a report with the paper's claims checked. "
                   "Flags left unset take the preset's value.", EXAMPLES)
    g = p.add_argument_group("experiment")
    g.add_argument("--preset", default="digits", help=f"sizes and settings: {', '.join(PRESETS)} (docs/reproducing.md)")
    g.add_argument("--out_dir", default=None,
                   help="directory of the experiment: one sub-directory per cell, and report/ (default: tk_{preset})")
    g.add_argument("--archs", nargs="+", default=None,
                   help="architectures, as fc{depth}, conv{depth} or myrtle{5,7,10} (e.g. fc1 fc2 conv2 myrtle5)")
    g.add_argument("--tasks", nargs="+", default=None, choices=TASKS,
                   help="binary: the two --classes (labels -1/+1 in the notebook); all: every class")
    g.add_argument("--classes", type=int, nargs="+", default=None,
                   help="the two classes of the binary task (CIFAR-10: 0 airplane, 1 automobile)")
    g.add_argument("--dataset", default=None, choices=cli.DATASETS, help="dataset")
    g.add_argument("--data_dir", default="./data",
                   help="folder holding the dataset's files in torchvision's layout (must already hold them: "
                        "the experiment does not download)")
    g.add_argument("--seed", type=cli.seed, default=None, help="--random_seed of every run (images, initialization)")
    g = p.add_argument_group("kernel predictor (analyze_ntk.py features / attack --arch)")
    g.add_argument("--n_train", type=int, default=None, help="class-balanced training images X of the predictor")
    g.add_argument("--n_test", type=int, default=None, help="class-balanced test images evaluated and attacked")
    g.add_argument("--eps", type=float, default=None, help="L-inf radius in 1/255 units (FGSM, PGD, the networks')")
    g.add_argument("--pgd_steps", type=int, default=None, help="PGD steps (from the clean image)")
    g.add_argument("--pgd_step", type=float, default=None, help="PGD step in 1/255 units (the notebook's 0.01 = 2.55)")
    g.add_argument("--n_features", type=int, default=None, help="leading eigen-indices analysed")
    g.add_argument("--n_tail", type=int, default=None, help="further eigen-indices, log-spaced to the last")
    g = p.add_argument_group("finite networks (run_exp.py --model fc|conv|myrtle)")
    g.add_argument("--widths", type=int, nargs="+", default=None, help="hidden widths (at least two: wider is lazier)")
    g.add_argument("--train_epochs", type=int, default=None, help="training epochs (clean)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (SGD, momentum 0.9). In the NTK parameterization a network is lazy because it "
                        "is wide; the rate sets how far it trains")
    g.add_argument("--train_size", type=int, default=None, help="class-balanced training subset (0: all)")
    g.add_argument("--test_size", type=int, default=None, help="class-balanced test subset of their evaluation (0: all)")
    g.add_argument("--batch_size", type=int, default=None, help="training batch size")
    g.add_argument("--motion_size", type=int, default=None,
                   help="training images of the empirical kernels whose motion is measured (dynamics --dataset_size)")
    g = p.add_argument_group("execution")
    add_execution_args(g, "finite networks", "finite/fc1_w32")
    return p


# ======================================================================================
# Settings
# ======================================================================================
def parse_arch(name):
    """'conv2' -> ('conv', 2); UserError for anything else."""
    m = re.fullmatch(r"(fc|conv|myrtle)(\d+)", name)
    if m is None or int(m.group(2)) < 1:
        raise UserError(f"--archs {name}: write an architecture as fc{{depth}}, conv{{depth}} or myrtle{{depth}} "
                        f"(e.g. fc1 conv2 myrtle5)")
    arch, depth = m.group(1), int(m.group(2))
    if arch == "myrtle" and depth not in cli.MYRTLE_DEPTHS:
        raise UserError(f"--archs {name}: Myrtle networks have depth {', '.join(map(str, cli.MYRTLE_DEPTHS))}")
    return arch, depth


def resolve(args):
    """The experiment's settings: the preset's, overridden by every flag given; checked before
    any run starts (UserError on bad input)."""
    import data
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    grid = dict(PRESETS[args.preset])
    for key in SETTINGS:
        if getattr(args, key, None) is not None:
            grid[key] = getattr(args, key)
    grid.update(preset=args.preset, data_dir=args.data_dir, out_dir=args.out_dir or f"tk_{args.preset}")
    grid["archs"] = list(dict.fromkeys(grid["archs"]))
    grid["tasks"] = [t for t in TASKS if t in grid["tasks"]]
    grid["widths"] = sorted(set(grid["widths"]))
    for arch in grid["archs"]:
        parse_arch(arch)
    n_classes = data.num_classes_of(grid["dataset"])
    classes = grid["classes"]
    if len(classes) != 2 or len(set(classes)) != 2 or not all(0 <= c < n_classes for c in classes):
        raise UserError(f"--classes: the binary task takes two distinct classes in [0, {n_classes - 1}] "
                        f"(got {' '.join(map(str, classes))})")
    for key in ("n_train", "n_test", "pgd_steps", "train_epochs", "batch_size", "motion_size"):
        if grid[key] <= 0:
            raise UserError(f"--{key} must be positive (got {grid[key]})")
    for key in ("n_features", "n_tail", "train_size", "test_size"):
        if grid[key] < 0:
            raise UserError(f"--{key} must be >= 0 (got {grid[key]})")
    for key in ("eps", "pgd_step", "lr"):
        if not 0 < grid[key] < float("inf"):
            raise UserError(f"--{key} must be finite and > 0 (got {grid[key]})")
    if len(grid["widths"]) < 2 or grid["widths"][0] <= 0:
        raise UserError(f"--widths: give at least two distinct positive widths (got {' '.join(map(str, grid['widths']))})")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {args.jobs})")
    for task in grid["tasks"]:
        n = 2 if task == "binary" else n_classes
        for key in ("n_train", "n_test"):
            if grid[key] % n:
                raise UserError(f"--{key} {grid[key]} is not divisible by the {n} classes of the {task} task")
    check_data(grid, {key: grid[key] for key in ("train_size", "test_size", "motion_size")})
    return grid


# ======================================================================================
# Cells
# ======================================================================================
def finite_name(arch, width):
    return f"finite/{arch}_w{width}"


def make_cells(grid):
    """Every cell, in dependency order: finite networks, their kernel motion, the kernel cells."""
    out, seed = grid["out_dir"], str(grid["seed"])
    finite, motion, kernel = [], [], []
    for arch in grid["archs"]:
        name, depth = parse_arch(arch)
        weight = ARCH_WEIGHT[name]
        runs = []
        for w in grid["widths"]:
            cell = finite_name(arch, w)
            argv = ["--dataset", grid["dataset"], *data_flags(grid), "--model", name, "--depth", str(depth),
                    "--width", str(w), "--standard_epochs", str(grid["train_epochs"]), "--linear_epochs", "0",
                    "--lr", f"{grid['lr']:g}", "--batch_size", str(grid["batch_size"]), "--eps", f"{grid['eps']:g}",
                    "--pgd_eval_steps", str(grid["pgd_steps"])]
            for key in ("train_size", "test_size"):
                if grid[key]:
                    argv += [f"--{key}", str(grid[key])]
            argv += ["--constant_save", "--save_models", "--random_seed", seed, "--no_progress",
                     "--save_path", os.path.join(out, cell)]
            finite.append(Cell(cell, "tk:finite", "run_exp", argv, [], out, arch=arch, width=w, weight=weight))
            runs.append(cell)
        cell = f"motion/{arch}"
        motion.append(Cell(cell, "tk:motion", "analyze_ntk",
                           ["dynamics", "--runs", *[os.path.join(out, r) for r in runs],
                            "--labels", *[f"w{w}" for w in grid["widths"]], "--dataset_size", str(grid["motion_size"]),
                            "--random_seed", seed, *data_flags(grid), "--out_dir", os.path.join(out, cell),
                            "--no_progress"], runs, out, arch=arch, weight=weight))
        checkpoints = [os.path.join(out, r, "parameters_final.pkl") for r in runs]
        for task in grid["tasks"]:
            common = ["--arch", name, "--depth", str(depth), "--dataset", grid["dataset"], *data_flags(grid),
                      "--n_train", str(grid["n_train"]), "--n_test", str(grid["n_test"]), "--ridge", "0", "--float64",
                      "--eps", f"{grid['eps']:g}", "--random_seed", seed, "--no_progress"]
            if task == "binary":
                common += ["--classes", *map(str, grid["classes"])]
            base = f"kernel/{task}/{arch}"
            kernel.append(Cell(f"{base}/features", "tk:features", "analyze_ntk",
                               ["features", *common, "--method", "fgsm", "--n_features", str(grid["n_features"]),
                                "--n_tail", str(grid["n_tail"]), "--n_images", "4",
                                "--out_dir", os.path.join(out, base, "features")],
                               [], out, result="eigen_features.json", task=task, arch=arch, weight=weight))
            for method in ("fgsm", "pgd"):
                pgd = (["--steps", str(grid["pgd_steps"]), "--step_size", f"{grid['pgd_step']:g}", "--no_random_start"]
                       if method == "pgd" else [])
                kernel.append(Cell(f"{base}/attack_{method}", f"tk:attack_{method}", "analyze_ntk",
                                   ["attack", *common, "--method", method, *pgd, "--transfer_to", *checkpoints,
                                    "--out_dir", os.path.join(out, base, f"attack_{method}")],
                                   runs, out, result="ntk_attack_ntk.json", task=task, arch=arch, method=method,
                                   weight=weight))
    return finite + motion + kernel


def experiment_flags(grid):
    """This experiment as explicit flags of tk_experiment.py (every setting)."""
    argv = ["--preset", grid["preset"], "--out_dir", grid["out_dir"]]
    for key in SETTINGS:
        value = grid[key]
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *[f"{v:g}" if isinstance(v, float) else str(v) for v in values]]
    return argv + data_flags(grid)


def print_commands(grid, cells):
    print_cell_commands(["python", script_path("tk_experiment.py"), *experiment_flags(grid)], cells,
                        (("finite", "finite networks: the attack cells need them"), ("motion", "their kernel motion"),
                         ("kernel", "the infinite-width kernels' features and attacks (the attacks need their "
                                    "architecture's finite networks)")))


# ======================================================================================
def run(args):
    """Run (or print, or report on) the experiment. Returns {'report': path or None, 'failed': [...],
    'ran': [cell names]}."""
    from tk_report import write_report
    grid = resolve(args)
    cells = make_cells(grid)
    if args.print_commands:
        print_commands(grid, cells)
        return {"report": None, "failed": [], "ran": []}
    command = shlex.join(["python", script_path("tk_experiment.py"), *experiment_flags(grid)])
    return run_experiment(grid["out_dir"], cells, args, lambda markers: write_report(grid, cells, markers, command))


def main(argv=None):
    # This process only checks, schedules and reports: the cells load JAX where they run.
    return utils.run_main(run, build_parser().parse_args(argv), uses_jax=False,
                          on_interrupt=lambda: "the complete cells are kept; rerun the same command to run the others")


if __name__ == "__main__":
    main()
