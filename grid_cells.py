"""The cells of kernel_epoch_grid.py: its presets, one Cell per run of the grid (a phase-1 run, a
phase-2 run, a kernel-motion analysis) with its directory, its script's argv and the cells it
needs; the commands that run the cells one by one (--print_commands); and whether a cell found on
disk is complete.

A cell is complete when its result file (results.json, dynamics.json) and the grid's marker
grid_cell.json exist, its config.json holds the flags this grid asks for (a complete cell made
with other flags is an error: use another --out_dir), and the phase-1 runs it was made from are the
ones now on disk. Running the cells: grid_scheduler.py; the report: grid_report.py.
"""
from __future__ import annotations

import json
import os
import shlex

import cli
from utils import UserError

# ======================================================================================
# The grid: settings and cells
# ======================================================================================
PRESETS = {
    # The demo's scale (demo.sh): runs on 2 CPU cores in about 20 minutes with --jobs 2.
    "digits": dict(dataset="digits", model="resnet18", width=8, eps=32.0, phase1_epochs=20, phase2_epochs=1,
                   second_lr=0.01, pgd_eval_steps=20, train_size=None, test_size=None, batch_size=128,
                   dynamics_size=50, kernel_epochs=[0, 0.5, 2, 5, 10, 20], seeds=[0, 1, 2]),
    # Real CIFAR-10 images, a narrow ResNet-18 on a subset: about 45 minutes on 2 CPU cores. Phase 2
    # runs 4 epochs (64 steps): 1 epoch of 1000 images (8 steps) left every phase 2 near chance.
    "cifar-subset": dict(dataset="cifar10", model="resnet18", width=8, eps=8.0, phase1_epochs=10,
                         phase2_epochs=4, second_lr=0.01, pgd_eval_steps=10, train_size=2000, test_size=500,
                         batch_size=128, dynamics_size=50, kernel_epochs=[0, 0.5, 2, 10], seeds=[0]),
    # The reference's recipe (README examples 1-4): CIFAR-10, full ResNet-18, PGD-100. GPU scale.
    "paper": dict(dataset="cifar10", model="resnet18", width=64, eps=4.0, phase1_epochs=101, phase2_epochs=100,
                  second_lr=0.01, pgd_eval_steps=100, train_size=None, test_size=None, batch_size=128,
                  dynamics_size=500, kernel_epochs=[0, 0.125, 0.5, 1, 2, 5, 10, 20, 50, 100], seeds=[0]),
}
SETTINGS = tuple(PRESETS["digits"])
PHASE1_KINDS = ("CC", "AC")   # --loaders of the phase-1 runs: benign, adversarial
PHASE2_KINDS = ("CC", "CA")   # --loaders of the phase-2 runs (phase 1 is skipped): benign, adversarial
KIND_WORDS = {"CC": "benign", "AC": "adversarial", "CA": "adversarial"}
MARKER = "grid_cell.json"
LOG = "grid_cell.log"
# Flags whose value may differ between a finished cell and this grid: where files are, not what
# was computed (a grid moved to another folder, or its data, stays complete).
PATH_FLAGS = ("save_path", "out_dir", "data_dir", "base_model_path", "runs", "no_progress", "resume",
              "overwrite")


def epoch_name(e):
    """A kernel epoch as run_exp.py names its checkpoint: 0, 0.5, 20 (never 20.0)."""
    return f"{e:g}"


class Cell:
    """One run of the grid: `name` (its directory under out_dir), the script and its argv, the
    cells it needs, and where its results are."""

    def __init__(self, name, kind, script, argv, deps, out_dir, result=None, **coords):
        self.name, self.kind, self.script, self.argv, self.deps = name, kind, script, argv, deps
        self.dir = os.path.join(out_dir, name)
        self.result = result or ("dynamics.json" if script == "analyze_ntk" else "results.json")
        self.coords = coords   # phase1, phase2, epoch, seed (those that apply)

    @property
    def result_file(self):
        return os.path.join(self.dir, self.result)

    def command(self):
        return shlex.join(["python", f"{self.script}.py", *self.argv])

    def spec(self):
        """What a worker process needs (picklable)."""
        return {"name": self.name, "script": self.script, "argv": self.argv, "dir": self.dir}


def data_flags(grid):
    """--data_dir of a cell's command, unless the experiment's dataset is the bundled digits."""
    return [] if grid["dataset"] == "digits" else ["--data_dir", grid["data_dir"]]


def add_execution_args(g, first_cells, cell_example):
    """The flags of an experiment's execution (grid_scheduler.run_experiment): --jobs,
    --print_commands, --cell, --report_only, --no_progress."""
    g.add_argument("--jobs", type=int, default=1,
                   help="cells run at once: 1 runs them in this process; N > 1 in N worker processes, each "
                        "pinned to its share of the CPUs (as taskset), so XLA's thread pools split the cores")
    g.add_argument("--print_commands", action="store_true",
                   help=f"print one shell command per cell ({first_cells} first) and the report's command, and run "
                        f"nothing: for a job array or GNU parallel. Run them from this directory")
    g.add_argument("--cell", default=None,
                   help=f"run only this cell (a name printed by --print_commands, e.g. {cell_example}), skipped if "
                        f"complete")
    g.add_argument("--report_only", action="store_true",
                   help="run nothing: write the report from the cells complete so far")
    cli.add_no_progress(g)


def run_exp_common(grid, seed):
    argv = ["--dataset", grid["dataset"], *data_flags(grid), "--model", grid["model"], "--width", str(grid["width"]),
            "--eps", f"{grid['eps']:g}", "--pgd_eval_steps", str(grid["pgd_eval_steps"]),
            "--batch_size", str(grid["batch_size"])]
    for key in ("train_size", "test_size"):
        if grid[key] is not None:
            argv += [f"--{key}", str(grid[key])]
    return argv + ["--random_seed", str(seed), "--save_models", "--no_progress"]


def make_cells(grid):
    """Every cell of the grid, in dependency order (phase-1 runs first)."""
    out = grid["out_dir"]
    phase1, phase2, dynamics = [], [], []
    for seed in grid["seeds"]:
        runs = {}
        for k1 in PHASE1_KINDS:
            name = f"phase1/{k1}_s{seed}"
            runs[k1] = os.path.join(out, name)
            phase1.append(Cell(name, f"phase1:{k1}", "run_exp",
                               ["--loaders", k1, "--standard_epochs", str(grid["phase1_epochs"]),
                                "--linear_epochs", "0", "--constant_save", *run_exp_common(grid, seed),
                                "--save_path", runs[k1]],
                               [], out, phase1=k1, seed=seed))
            for e in grid["kernel_epochs"]:
                base = os.path.join(runs[k1], f"parameters_checkpoint_{epoch_name(e)}.pkl")
                for k2 in PHASE2_KINDS:
                    name2 = f"phase2/{k1}_s{seed}/e{epoch_name(e)}_{k2}"
                    phase2.append(Cell(name2, f"phase2:{k2}", "run_exp",
                                       ["--base_model_path", base, "--loaders", k2, "--linear_epochs",
                                        str(grid["phase2_epochs"]), "--second_lr", f"{grid['second_lr']:g}",
                                        "--centering", "--skip_first_test", *run_exp_common(grid, seed),
                                        "--save_path", os.path.join(out, name2)],
                                       [name], out, phase1=k1, phase2=k2, epoch=e, seed=seed))
        name = f"dynamics/s{seed}"
        argv = ["dynamics", "--runs", runs["CC"], runs["AC"], "--labels", "CC", "AC",
                "--dataset_size", str(grid["dynamics_size"]), "--random_seed", str(seed), *data_flags(grid)]
        dynamics.append(Cell(name, "dynamics", "analyze_ntk", argv + ["--out_dir", os.path.join(out, name),
                                                                      "--no_progress"],
                             [f"phase1/CC_s{seed}", f"phase1/AC_s{seed}"], out, seed=seed))
    return phase1 + phase2 + dynamics


# ======================================================================================
# Commands
# ======================================================================================
def grid_flags(grid, jobs=None):
    """This grid as explicit flags of kernel_epoch_grid.py (every setting, so a printed line does
    not depend on the preset's values of another version)."""
    argv = ["--preset", grid["preset"], "--out_dir", grid["out_dir"],
            "--kernel_epochs", *map(epoch_name, grid["kernel_epochs"]), "--seeds", *map(str, grid["seeds"])]
    for key in SETTINGS:
        if key in ("kernel_epochs", "seeds"):
            continue
        value = grid[key]
        if key in ("train_size", "test_size") and value is None:
            value = 0
        argv += [f"--{key}", f"{value:g}" if isinstance(value, float) else str(value)]
    return argv + data_flags(grid)


def check_data(grid, sizes, on_disk=True):
    """The dataset of `grid` (its 'dataset', 'data_dir') is on disk (an experiment never
    downloads: many cells would race for it; not checked without `on_disk`), and the image
    counts `sizes` ({flag: count or None}) divide by its classes."""
    import data
    folder, missing = data.missing_files(grid["dataset"], grid["data_dir"])
    if missing and on_disk:
        raise UserError(f"--data_dir {grid['data_dir']} holds no {grid['dataset']} ({folder} lacks "
                        f"{', '.join(missing)}): put the files there first (run_exp.py --dataset {grid['dataset']} "
                        f"--data_dir {grid['data_dir']} downloads them)")
    n_classes = data.num_classes_of(grid["dataset"])
    for flag, size in sizes.items():
        if size and size % n_classes:
            raise UserError(f"--{flag} {size} is not divisible by the number of classes ({n_classes}) of "
                            f"{grid['dataset']}")


def script_path(script="kernel_epoch_grid.py"):
    """How to call this repository's `script` from the current directory."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    rel = os.path.relpath(here)
    return rel if not rel.startswith("..") else here


def print_commands(grid, cells):
    print_cell_commands(["python", script_path(), *grid_flags(grid)], cells,
                        (("phase1", "phase-1 runs: every other cell needs them"),
                         ("phase2", "phase-2 runs (each needs its phase-1 run)"),
                         ("dynamics", "kernel motion (each needs both phase-1 runs of its seed)")))


def print_cell_commands(base, cells, stages):
    """One command per cell (`base` + --cell NAME), grouped by the (prefix, words) `stages` in
    dependency order, then the report's command."""
    for prefix, words in stages:
        print(f"# {words}")
        for c in cells:
            if c.name == prefix or c.name.startswith(prefix + "/"):
                print(shlex.join(base + ["--no_progress", "--cell", c.name]))
    print("# the report, once every cell is complete")
    print(shlex.join(base + ["--report_only"]))


# ======================================================================================
# Is a cell complete?
# ======================================================================================
def read_json(path):
    """The JSON object in `path`; None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def expected_args(cell):
    """The parsed arguments the cell's script gets, as config.json / dynamics.json record them."""
    import importlib
    return vars(importlib.import_module(cell.script).build_parser().parse_args(cell.argv))


def json_equal(a, b):
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def differing_flag(recorded, expected):
    """The first flag (not a path) whose recorded value differs from the expected one, else None."""
    for key, value in expected.items():
        if key in PATH_FLAGS or key not in recorded:
            continue
        if not json_equal(recorded[key], value):
            return key, recorded[key], value
    return None


def recorded_args(cell):
    """The arguments a cell's run recorded (config.json of run_exp, dynamics.json of analyze_ntk)."""
    if cell.script == "analyze_ntk":
        obj = read_json(cell.result_file)
        return None if obj is None else obj.get("config", {}).get("args")
    obj = read_json(os.path.join(cell.dir, "config.json"))
    return None if obj is None else obj.get("args")


def cell_state(cell, markers):
    """'complete', 'stale' (made from phase-1 runs that have since been redone), 'incomplete';
    UserError if it is complete but was made with other flags. `markers`: name -> marker dict of
    the cells found complete so far (dependencies come first)."""
    marker = read_json(os.path.join(cell.dir, MARKER))
    if marker is None or marker.get("cell") != cell.name:
        return "incomplete"
    if marker.get("status") == "ok" and not os.path.isfile(cell.result_file):
        return "incomplete"
    recorded = recorded_args(cell)
    if recorded is None:
        return "incomplete"
    diff = differing_flag(recorded, expected_args(cell))
    if diff is not None:
        key, old, new = diff
        raise UserError(f"{cell.dir} holds a finished run made with --{key} {old!r}, but this grid asks for "
                        f"{new!r}: use another --out_dir (or remove that directory)")
    deps = marker.get("deps", {})
    if any(d not in markers or deps.get(d) != markers[d].get("run_id") for d in cell.deps):
        return "stale"
    return "complete"


def survey(cells):
    """(markers of complete cells, [cells to run]) — raises UserError before anything runs if a
    finished cell contradicts this grid's flags."""
    markers, todo = {}, []
    for cell in cells:   # dependency order: a cell's dependencies are surveyed before it
        state = cell_state(cell, markers)
        if state == "complete":
            markers[cell.name] = read_json(os.path.join(cell.dir, MARKER))
        else:
            todo.append(cell)
    return markers, todo
