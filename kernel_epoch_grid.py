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

A cell is complete when its result file (results.json, dynamics.json) and the grid's marker
grid_cell.json exist, its config.json holds the flags this grid asks for (a complete cell made
with other flags is an error: use another --out_dir), and the phase-1 runs it was made from are the
ones now on disk. An incomplete run_exp cell continues from its resume.pkl when that was written
with the same flags, else it starts again in an emptied directory.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
import time
import uuid

import cli
import utils
from utils import UserError

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
# Relative cost of each kind of cell, for longest-first scheduling among ready cells.
COST = {"phase1:AC": 100, "phase2:CA": 30, "dynamics": 20, "phase1:CC": 15, "phase2:CC": 10}

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
    g.add_argument("--jobs", type=int, default=1,
                   help="cells run at once: 1 runs them in this process; N > 1 in N worker processes, each "
                        "pinned to its share of the CPUs (as taskset), so XLA's thread pools split the cores")
    g.add_argument("--print_commands", action="store_true",
                   help="print one shell command per cell (phase-1 runs first) and the report's command, and run "
                        "nothing: for a job array or GNU parallel. Run them from this directory")
    g.add_argument("--cell", default=None,
                   help="run only this cell (a name printed by --print_commands, e.g. phase2/AC_s0/e2_CA), "
                        "skipped if complete")
    g.add_argument("--report_only", action="store_true",
                   help="run nothing: write the report from the cells complete so far")
    cli.add_no_progress(g)
    return p


# ======================================================================================
# The grid: settings and cells
# ======================================================================================
def epoch_name(e):
    """A kernel epoch as run_exp.py names its checkpoint: 0, 0.5, 20 (never 20.0)."""
    return f"{e:g}"


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
    check_data(grid)
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


def check_data(grid):
    """The dataset is on disk (the grid never downloads: many cells would race for it), and the
    subsets and the kernel image count fit it."""
    import data
    if grid["dataset"] in data.CIFAR:
        spec = data.CIFAR[grid["dataset"]]
        folder = os.path.join(grid["data_dir"], spec.folder)
        missing = [f for f, _ in spec.train + spec.test if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise UserError(f"--data_dir {grid['data_dir']} holds no {grid['dataset']} ({folder} lacks "
                            f"{', '.join(missing)}): put the files there first (run_exp.py --dataset {grid['dataset']} "
                            f"--data_dir {grid['data_dir']} downloads them)")
    n_classes = data.num_classes_of(grid["dataset"])
    for key in ("train_size", "test_size", "dynamics_size"):
        if grid[key] is not None and grid[key] % n_classes:
            raise UserError(f"--{key} {grid[key]} is not divisible by the number of classes ({n_classes}) of "
                            f"{grid['dataset']}")


class Cell:
    """One run of the grid: `name` (its directory under out_dir), the script and its argv, the
    cells it needs, and where its results are."""

    def __init__(self, name, kind, script, argv, deps, out_dir, **coords):
        self.name, self.kind, self.script, self.argv, self.deps = name, kind, script, argv, deps
        self.dir = os.path.join(out_dir, name)
        self.coords = coords   # phase1, phase2, epoch, seed (those that apply)

    @property
    def result_file(self):
        return os.path.join(self.dir, "dynamics.json" if self.script == "analyze_ntk" else "results.json")

    def command(self):
        return shlex.join(["python", f"{self.script}.py", *self.argv])

    def spec(self):
        """What a worker process needs (picklable)."""
        return {"name": self.name, "script": self.script, "argv": self.argv, "dir": self.dir}


def run_exp_common(grid, seed):
    argv = ["--dataset", grid["dataset"], "--model", grid["model"], "--width", str(grid["width"]),
            "--eps", f"{grid['eps']:g}", "--pgd_eval_steps", str(grid["pgd_eval_steps"]),
            "--batch_size", str(grid["batch_size"])]
    if grid["dataset"] != "digits":
        argv += ["--data_dir", grid["data_dir"]]
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
                "--dataset_size", str(grid["dynamics_size"]), "--random_seed", str(seed)]
        if grid["dataset"] != "digits":
            argv += ["--data_dir", grid["data_dir"]]
        dynamics.append(Cell(name, "dynamics", "analyze_ntk", argv + ["--out_dir", os.path.join(out, name),
                                                                      "--no_progress"],
                             [f"phase1/CC_s{seed}", f"phase1/AC_s{seed}"], out, seed=seed))
    return phase1 + phase2 + dynamics


# ======================================================================================
# Is a cell complete?
# ======================================================================================
def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def expected_args(cell):
    """The parsed arguments the cell's script gets, as config.json / dynamics.json record them."""
    import importlib
    return vars(importlib.import_module(cell.script).build_parser().parse_args(cell.argv))


def _json_equal(a, b):
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def differing_flag(recorded, expected):
    """The first flag (not a path) whose recorded value differs from the expected one, else None."""
    for key, value in expected.items():
        if key in PATH_FLAGS or key not in recorded:
            continue
        if not _json_equal(recorded[key], value):
            return key, recorded[key], value
    return None


def recorded_args(cell):
    """The arguments a cell's run recorded (config.json of run_exp, dynamics.json of analyze_ntk)."""
    if cell.script == "analyze_ntk":
        obj = _read_json(cell.result_file)
        return None if obj is None else obj.get("config", {}).get("args")
    obj = _read_json(os.path.join(cell.dir, "config.json"))
    return None if obj is None else obj.get("args")


def cell_state(cell, markers):
    """'complete', 'stale' (made from phase-1 runs that have since been redone), 'incomplete';
    UserError if it is complete but was made with other flags. `markers`: name -> marker dict of
    the cells found complete so far (dependencies come first)."""
    marker = _read_json(os.path.join(cell.dir, MARKER))
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
            markers[cell.name] = _read_json(os.path.join(cell.dir, MARKER))
        else:
            todo.append(cell)
    return markers, todo


# ======================================================================================
# Running a cell (in this process or in a worker)
# ======================================================================================
def _prepare_dir(spec, expected):
    """Make the cell's directory ready for a fresh or resumed run; returns the extra argv.
    A run_exp cell continues from resume.pkl if that was written with exactly these flags;
    otherwise what an earlier attempt left is removed (the cell is not complete, and run_exp.py
    refuses to write over another run)."""
    import shutil
    if spec["script"] == "run_exp":
        resume = os.path.join(spec["dir"], "resume.pkl")
        if os.path.isfile(resume) and not os.path.isfile(os.path.join(spec["dir"], MARKER)):
            try:
                saved = utils.restricted_load(resume)["args"]
            except (UserError, KeyError, TypeError):
                saved = None
            free = ("resume", "no_progress")
            if saved is not None and _json_equal({k: v for k, v in saved.items() if k not in free},
                                                 {k: v for k, v in expected.items() if k not in free}):
                return ["--resume"]
        if os.path.isdir(spec["dir"]):
            shutil.rmtree(spec["dir"])
    else:
        # analyze_ntk keeps a validated kernel cache in its out_dir: reuse it; only the marker goes.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(spec["dir"], MARKER))
    os.makedirs(spec["dir"], exist_ok=True)
    return []


@contextlib.contextmanager
def _output_to(log):
    """Send this process's output to `log` while a cell runs: Python's (print, warnings) and the
    C++ libraries' writes to file descriptors 1 and 2 (XLA's slow-compilation alarms)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
            log.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def run_cell(spec, deps):
    """Run one cell through its script's run(args); write its marker. Returns a status dict
    (never raises: a failed cell must not stop the independent ones)."""
    import importlib
    import traceback
    t0, c0 = time.time(), time.process_time()
    status = {"cell": spec["name"], "status": "failed", "message": ""}
    try:
        module = importlib.import_module(spec["script"])
        expected = vars(module.build_parser().parse_args(spec["argv"]))
        extra = _prepare_dir(spec, expected)
        args = module.build_parser().parse_args(spec["argv"] + extra)
        with open(os.path.join(spec["dir"], LOG), "a") as log, _output_to(log):
            print(f"$ {shlex.join(['python', spec['script'] + '.py', *spec['argv'], *extra])}", flush=True)
            try:
                module.run(args)
                status.update(status="ok")
            except UserError as e:
                status["message"] = str(e)
                # A diverged phase 2 (run_exp stops on a non-finite loss) is a result, not a failure:
                # the same flags diverge again, so the cell is complete with no accuracy.
                if "non-finite" in str(e):
                    status.update(status="diverged")
                print(f"error: {e}")
    except Exception as e:   # a bug or a crash: logged, reported, the grid goes on
        status["message"] = f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError), open(os.path.join(spec["dir"], LOG), "a") as log:
            traceback.print_exc(file=log)
    status.update(seconds=round(time.time() - t0, 2), cpu_seconds=round(time.process_time() - c0, 2))
    if status["status"] in ("ok", "diverged"):
        marker = {**status, "run_id": uuid.uuid4().hex, "deps": deps, "script": spec["script"], "argv": spec["argv"],
                  "load_average": list(os.getloadavg())}
        utils.atomic_json(os.path.join(spec["dir"], MARKER), marker)
        status["run_id"] = marker["run_id"]
    return status


_WORKER_CPUS = None


def _init_worker(cpu_queue):
    """Pin this worker to its share of the CPUs before JAX starts: XLA sizes its thread pools
    from the CPUs a process may run on, so N workers share the cores instead of each taking all
    of them (XLA_FLAGS intra_op_parallelism_threads has no effect on JAX's CPU client)."""
    global _WORKER_CPUS
    _WORKER_CPUS = cpu_queue.get()
    os.sched_setaffinity(0, _WORKER_CPUS)
    utils.enable_compilation_cache()


def cpu_shares(jobs):
    """`jobs` disjoint CPU sets covering this process's CPUs (shared round-robin if jobs > CPUs)."""
    cpus = sorted(os.sched_getaffinity(0))
    if jobs >= len(cpus):
        return [{cpus[i % len(cpus)]} for i in range(jobs)]
    return [set(cpus[i * len(cpus) // jobs:(i + 1) * len(cpus) // jobs]) for i in range(jobs)]


def execute(cells, markers, jobs, no_progress):
    """Run `cells` (those not complete), each once its dependencies are, at most `jobs` at a time.
    Returns the list of failure statuses."""
    schedule = _Schedule(cells, markers, no_progress)
    if jobs == 1:
        schedule.run_here()
    else:
        schedule.run_in_workers(jobs)
    return schedule.close()


class _Schedule:
    """The cells still to run, those running and those that failed; `markers` (cell name -> its
    grid_cell.json) grows as cells complete."""

    def __init__(self, cells, markers, no_progress):
        from tqdm import tqdm
        self.total, self.markers = len(cells), markers
        self.waiting, self.failed, self.running, self.count = list(cells), [], {}, 0
        self.bar = tqdm(total=len(cells), desc="cells", unit="cell", disable=no_progress or None, dynamic_ncols=True)
        self.write = tqdm.write   # a line above the progress bar

    def finished(self, cell, st):
        self.bar.update()
        self.count += 1
        n = f"[{self.count}/{self.total}]"
        if st["status"] in ("ok", "diverged"):
            self.markers[cell.name] = _read_json(os.path.join(cell.dir, MARKER))
            self.write(f"{n} {cell.name}: {summary_line(cell, st)} ({st['seconds']:.0f} s)")
        else:
            self.failed.append(st)
            self.write(f"{n} {cell.name}: FAILED: {st['message']} (log: {os.path.join(cell.dir, LOG)})")

    def ready(self):
        """Cells whose dependencies are complete, longest first; drop those whose dependency failed."""
        out = []
        for c in list(self.waiting):
            if any(f["cell"] in c.deps for f in self.failed):
                self.waiting.remove(c)
                self.failed.append({"cell": c.name, "status": "skipped", "message": "a cell it needs failed"})
                self.bar.update()
                self.count += 1
            elif all(d in self.markers for d in c.deps):
                out.append(c)
        return sorted(out, key=lambda c: -COST[c.kind])

    def deps_of(self, c):
        return {d: self.markers[d]["run_id"] for d in c.deps}

    def run_here(self):
        """Every cell in this process, one at a time."""
        utils.enable_compilation_cache()
        while self.waiting:
            nxt = self.ready()
            if not nxt:
                break
            self.waiting.remove(nxt[0])
            self.bar.set_postfix_str(nxt[0].name)
            self.finished(nxt[0], run_cell(nxt[0].spec(), self.deps_of(nxt[0])))

    def run_in_workers(self, jobs):
        """`jobs` worker processes; a new pool after a worker died (crashed, killed, out of memory)."""
        import multiprocessing as mp
        ctx = mp.get_context("spawn")   # fresh interpreters: JAX must not be forked
        retried = set()
        while self.waiting and self._pool(ctx, jobs, retried):
            pass

    def _pool(self, ctx, jobs, retried):
        """Run cells in one pool until none is left or a worker dies; returns whether one died."""
        import concurrent.futures as cf
        queue = ctx.Queue()
        for share in cpu_shares(jobs):
            queue.put(share)
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,)) as pool:
            broken = False
            while (self.waiting or self.running) and not broken:
                for c in self.ready():
                    if len(self.running) >= jobs:
                        break
                    self.waiting.remove(c)
                    self.running[pool.submit(run_cell, c.spec(), self.deps_of(c))] = c
                self.bar.set_postfix_str(", ".join(c.name for c in self.running.values()))
                if not self.running:
                    break
                done, _ = cf.wait(self.running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    cell = self.running.pop(fut)
                    try:
                        self.finished(cell, fut.result())
                    except cf.process.BrokenProcessPool:
                        broken = True
                        if cell.name in retried:
                            self.finished(cell, {"cell": cell.name, "status": "failed",
                                                 "message": "its worker process died twice"})
                        else:   # once more in the next pool: a crash can be transient
                            retried.add(cell.name)
                            self.waiting.append(cell)
                            self.write(f"{cell.name}: its worker process died; it runs again")
                    except Exception as e:   # e.g. its result could not be sent back
                        self.finished(cell, {"cell": cell.name, "status": "failed", "message": f"worker failed: {e}"})
            if broken:   # the other cells of the dead pool run again too
                for fut, cell in list(self.running.items()):
                    self.running.pop(fut)
                    self.waiting.append(cell)
        return broken

    def close(self):
        self.bar.close()
        for c in self.waiting:   # only if a dependency never completed
            self.failed.append({"cell": c.name, "status": "skipped", "message": "a cell it needs did not complete"})
        return self.failed


def summary_line(cell, st):
    if st["status"] == "diverged":
        return "diverged (non-finite loss)"
    if cell.script == "analyze_ntk":
        return "kernel motion done"
    res = _read_json(cell.result_file) or {}
    r = res.get("linear" if cell.kind.startswith("phase2") else "standard", {})
    return f"clean {r.get('clean', float('nan')):.3f}  linf {r.get('linf', float('nan')):.3f}  " \
           f"l2 {r.get('l2', float('nan')):.3f}"


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
    if grid["dataset"] != "digits":
        argv += ["--data_dir", grid["data_dir"]]
    return argv


def script_path():
    """How to call this script from the current directory."""
    here = os.path.abspath(__file__)
    rel = os.path.relpath(here)
    return rel if not rel.startswith("..") else here


def print_commands(grid, cells):
    base = ["python", script_path(), *grid_flags(grid)]
    stages = (("phase1", "phase-1 runs: every other cell needs them"),
              ("phase2", "phase-2 runs (each needs its phase-1 run)"),
              ("dynamics", "kernel motion (each needs both phase-1 runs of its seed)"))
    for prefix, words in stages:
        print(f"# {words}")
        for c in cells:
            if c.name.startswith(prefix + "/"):
                print(shlex.join(base + ["--no_progress", "--cell", c.name]))
    print("# the report, once every cell is complete")
    print(shlex.join(base + ["--report_only"]))


# ======================================================================================
# Report
# ======================================================================================
def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def _mean_std(values):
    import numpy as np
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(m, sd, n):
    if n == 0:
        return "n/a"
    return f"{m:.3f}" if n == 1 else f"{m:.3f} ± {sd:.3f}"


def collect(grid, cells, markers):
    """Rows of every phase-2 cell, phase-1 finals and kernel distances, from the cell directories."""
    rows, finals, dist = [], [], {}
    for c in cells:
        marker = markers.get(c.name)
        if c.kind.startswith("phase1"):
            res = _read_json(c.result_file) if marker else None
            r = (res or {}).get("standard", {})
            finals.append({"phase1": c.coords["phase1"], "seed": c.coords["seed"], "complete": bool(marker),
                           **{k: r.get(k) for k in ("clean", "linf", "l2")}})
        elif c.kind.startswith("phase2"):
            row = {"phase1": c.coords["phase1"], "phase2": c.coords["phase2"], "kernel_epoch": c.coords["epoch"],
                   "seed": c.coords["seed"], "status": marker["status"] if marker else "missing",
                   "clean": None, "linf": None, "l2": None}
            if marker and marker["status"] == "ok":
                r = (_read_json(c.result_file) or {}).get("linear", {})
                row.update({k: r.get(k) for k in ("clean", "linf", "l2")})
            rows.append(row)
        elif marker:
            d = _read_json(c.result_file) or {}
            for label, run in d.get("runs", {}).items():
                matrix = run["distance_matrix"]
                dist.setdefault(label, {})[c.coords["seed"]] = {
                    "epochs": run["epochs"], "to_final": [r[-1] for r in matrix],
                    "to_init": run["distance_to_init"]}
    return rows, finals, dist


def _distance_at(dist, k1, e):
    """Mean and std over seeds of d(K_e, K_T) of phase-1 kind k1 at epoch e."""
    vals = []
    for run in dist.get(k1, {}).values():
        if e in run["epochs"]:
            vals.append(run["to_final"][run["epochs"].index(e)])
    return _mean_std(vals)


def _curve(rows, k1, k2, metric, epochs):
    return [_mean_std([r[metric] for r in rows if (r["phase1"], r["phase2"], r["kernel_epoch"]) == (k1, k2, e)])
            for e in epochs]


def claims(grid, rows, finals, epochs):
    """The paper's claims, each checked on this grid with numbers (markdown lines)."""
    import numpy as np

    def stat(k1, k2, e, metric="linf"):
        return _mean_std([r[metric] for r in rows if (r["phase1"], r["phase2"], r["kernel_epoch"]) == (k1, k2, e)])

    def final(k1, metric="linf"):
        return _mean_std([f[metric] for f in finals if f["phase1"] == k1])

    def se(sd, n):
        return sd / math.sqrt(n) if n > 1 else float("nan")

    if any(stat(k1, k2, e)[2] == 0 for k1 in PHASE1_KINDS for k2 in PHASE2_KINDS for e in epochs):
        return ["Not every combination has a complete cell yet: the claims are checked once the grid is complete."]
    lines = []
    e0, eT = epochs[0], epochs[-1]
    pos = [e for e in epochs if e > 0]
    # Claim 1a: benign phase 2 on AT kernels keeps robustness that grows with e.
    a0, aT = stat("AC", "CC", e0), stat("AC", "CC", eT)
    curve = [stat("AC", "CC", e)[0] for e in epochs]
    rho = _spearman(epochs, curve)
    diff = aT[0] - a0[0]
    diff_se = math.sqrt(se(a0[1], a0[2]) ** 2 + se(aT[1], aT[2]) ** 2)
    grows = (len(epochs) > 1 and diff > 0 and (math.isnan(diff_se) or diff > 2 * diff_se)
             and (math.isnan(rho) or rho > 0))
    lines.append(
        f"1. **Benign phase 2 on adversarially trained kernels keeps robustness that grows with e.** "
        f"L∞ PGD accuracy of benign centered training on the AT kernel: {_fmt(*a0)} at e = {epoch_name(e0)}, "
        f"{_fmt(*aT)} at e = {epoch_name(eT)} (difference {diff:+.3f}"
        + (f", standard error {diff_se:.3f}" if not math.isnan(diff_se) else "")
        + (f"; Spearman ρ of the mean against e: {rho:+.2f}" if not math.isnan(rho) else "")
        + f"); the AT network itself (end of phase 1): "
        f"{_fmt(*final('AC'))}. Best over e: {max(curve):.3f} at e = {epoch_name(epochs[int(np.argmax(curve))])}. "
        f"**{'Consistent' if grows else 'Not consistent'} with the claim** (criterion: the mean at the last e "
        f"exceeds the one at the first e by more than twice the standard error of the difference, and ρ > 0 "
        f"when there are 3 or more epochs).")
    # Claim 1b: benign (CC) kernels give none.
    if pos:
        cc = [stat("CC", "CC", e) for e in pos]
        gap = [stat("AC", "CC", e)[0] - c[0] for e, c in zip(pos, cc)]
        fin_cc = final("CC")
        none = all(g > 0 for g in gap) and max(c[0] for c in cc) <= fin_cc[0] + 0.1
        lines.append(
            "2. **Benign kernels give none.** L∞ PGD accuracy of benign centered training on the clean-trained "
            "kernel, over e > 0: " + ", ".join(f"{_fmt(*c)} (e = {epoch_name(e)})" for c, e in zip(cc, pos))
            + f"; the clean network itself: {_fmt(*fin_cc)}. The AT kernel's advantage at the same e: "
            + ", ".join(f"{g:+.3f}" for g in gap)
            + f". **{'Consistent' if none else 'Not consistent'} with the claim** (criterion: the AT kernel beats "
            f"the benign kernel at every e > 0, and the benign kernel's best stays within 0.1 of the clean "
            f"network's).")
    # Claim 2: adversarial training on a fixed kernel gains robustness.
    for n, (k1, words) in enumerate((("AC", "adversarially trained"), ("CC", "clean-trained")), start=3):
        gains = [stat(k1, "CA", e)[0] - stat(k1, "CC", e)[0] for e in epochs]
        best = [stat(k1, "CA", e) for e in epochs]
        i = int(np.argmax([b[0] for b in best]))
        gain_pos = [g for e, g in zip(epochs, gains) if e > 0]
        mean_gain = float(np.mean(gain_pos)) if gain_pos else float("nan")
        lines.append(
            f"{n}. **Adversarial training on a fixed {words} kernel gains robustness.** "
            f"L∞ PGD gain of adversarial (CA) over benign (CC) phase 2 at each e: "
            + ", ".join(f"{g:+.3f} (e = {epoch_name(e)})" for e, g in zip(epochs, gains))
            + f"; mean over e > 0: {mean_gain:+.3f}. Best CA phase 2: L∞ PGD {_fmt(*best[i])} at clean "
            f"{_fmt(*stat(k1, 'CA', epochs[i], 'clean'))} (e = {epoch_name(epochs[i])}). "
            f"**{'Consistent' if mean_gain > 0 else 'Not consistent'} with the claim** (criterion: a positive "
            f"mean gain over e > 0).")
    return lines


def _spearman(x, y):
    import numpy as np
    pairs = [(a, b) for a, b in zip(x, y) if not math.isnan(b)]
    if len(pairs) < 3:
        return float("nan")
    rx = np.argsort(np.argsort([p[0] for p in pairs]))
    ry = np.argsort(np.argsort([p[1] for p in pairs]))
    return float(np.corrcoef(rx, ry)[0, 1]) if np.std(ry) > 0 else float("nan")


def figure(grid, rows, finals, dist, epochs, path):
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt
    import numpy as np
    colors = {"CC": "tab:blue", "AC": "tab:red"}
    styles = {"CC": ("-", "o"), "CA": ("--", "s")}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    panels = (("clean", "clean accuracy"),
              ("linf", f"L∞ PGD-{grid['pgd_eval_steps']} accuracy (ε {grid['eps']:g}/255)"),
              ("l2", f"L2 PGD-{grid['pgd_eval_steps']} accuracy (ε {0.25:g})"))
    for ax, (metric, title) in zip(axes.flat, panels):
        for k1 in PHASE1_KINDS:
            for k2 in PHASE2_KINDS:
                stats = _curve(rows, k1, k2, metric, epochs)
                m = np.array([x[0] for x in stats])
                sd = np.array([x[1] for x in stats])
                ls, mk = styles[k2]
                ax.errorbar(epochs, m, yerr=sd, color=colors[k1], ls=ls, marker=mk, ms=4, capsize=3,
                            label=f"{KIND_WORDS[k1]} kernel ({k1}), {KIND_WORDS[k2]} phase 2 ({k2})")
            fm, fsd, n = _mean_std([f[metric] for f in finals if f["phase1"] == k1])
            if n:
                ax.axhline(fm, color=colors[k1], ls=":", lw=1.2, label=f"phase-1 {k1} network at epoch "
                                                                         f"{grid['phase1_epochs']}")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("accuracy")
    ax = axes[1, 1]
    for k1 in PHASE1_KINDS:
        runs = list(dist.get(k1, {}).values())
        if not runs:
            continue
        common = sorted(set.intersection(*[set(r["epochs"]) for r in runs]))
        vals = np.array([[r["to_final"][r["epochs"].index(e)] for e in common] for r in runs])
        m, sd = vals.mean(0), vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(common))
        ax.plot(common, m, color=colors[k1], lw=1.5, label=f"{k1} run ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.fill_between(common, m - sd, m + sd, color=colors[k1], alpha=0.2)
        marked = [e for e in epochs if e in common]
        ax.plot(marked, [m[common.index(e)] for e in marked], "o", color=colors[k1], ms=5)
    ax.set_title("kernel distance to the final kernel d(K_e, K_T)")
    ax.set_ylabel("1 - cos(K_e, K_T)  (Frobenius)")
    ax.legend(fontsize=8)
    pos = [e for e in epochs if e > 0]
    for ax in axes.flat:
        if pos:
            ax.set_xscale("symlog", linthresh=min(pos))
        ax.set_xlim(-0.05 * min(pos or [1]), grid["phase1_epochs"] * 1.08)
        ax.set_xticks(epochs, [epoch_name(e) for e in epochs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("kernel epoch e (phase-1 checkpoint; symlog axis)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8.5, bbox_to_anchor=(0.5, -0.06))
    n_seeds = len(grid["seeds"])
    fig.suptitle(f"{grid['preset']}: {grid['dataset']}, {grid['model']} width {grid['width']}; phase 1 {plural(grid['phase1_epochs'], 'epoch')}, "
                 f"phase 2 (centered) {plural(grid['phase2_epochs'], 'epoch')} at lr "
                 f"{grid['second_lr']:g}; mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    utils.atomic_write_bytes(path, buf.getvalue())


def write_report(grid, cells, markers, grid_command):
    """report/: report.md, grid.png, results.json, results.csv, commands.sh. Returns report.md's path.
    Depends only on the cells' results (no timings or dates), so the same cells give the same report."""
    import csv
    import io
    rows, finals, dist = collect(grid, cells, markers)
    epochs = grid["kernel_epochs"]
    rdir = os.path.join(grid["out_dir"], "report")
    os.makedirs(rdir, exist_ok=True)
    missing = [c.name for c in cells if c.name not in markers]
    figure(grid, rows, finals, dist, epochs, os.path.join(rdir, "grid.png"))
    utils.atomic_json(os.path.join(rdir, "results.json"),
                      {"settings": {k: v for k, v in grid.items()}, "phase2": rows, "phase1_final": finals,
                       "kernel_distance": dist, "missing": missing})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["phase1"])
    w.writeheader()
    w.writerows(rows)
    utils.atomic_write_bytes(os.path.join(rdir, "results.csv"), buf.getvalue().encode())
    commands = ["#!/usr/bin/env bash", "# The exact runs of this grid, from the repository root, in dependency order.",
                "set -euo pipefail"] + [c.command() for c in cells]
    utils.atomic_write_bytes(os.path.join(rdir, "commands.sh"), ("\n".join(commands) + "\n").encode())

    def f3(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    md = [f"# Robustness of phase 2 against the kernel epoch ({grid['preset']})", ""]
    if missing:
        md += [f"**Incomplete: {len(missing)} of {len(cells)} cells are missing** "
               f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); their rows read n/a.", ""]
    md += ["## Settings", "",
           f"- data: {grid['dataset']}" + (f" (train subset {grid['train_size']}" if grid["train_size"] else " (all training images")
           + (f", test subset {grid['test_size']})" if grid["test_size"] else ", all test images)"),
           f"- network: {grid['model']}, width {grid['width']}; batch {grid['batch_size']}",
           f"- phase 1: {plural(grid['phase1_epochs'], 'epoch')}, benign (CC) and adversarial (AC: a clean step and a PGD-20 step "
           f"per batch, ε {grid['eps']:g}/255), lr 0.1, checkpoints at every epoch and at 0.125, 0.25, 0.375, 0.5, 0.75, "
           f"1.5, 2.5",
           f"- phase 2: centered dynamics J(θ_e)(θ − θ_e) on the frozen kernel of the epoch-e checkpoint, "
           f"{plural(grid['phase2_epochs'], 'epoch')} at lr {grid['second_lr']:g}, "
           f"benign (CC) or adversarial (CA)",
           f"- kernel epochs e: {', '.join(map(epoch_name, epochs))}; seeds: {', '.join(map(str, grid['seeds']))}",
           f"- evaluation (run_exp.py after phase 2): clean, L∞ PGD-{grid['pgd_eval_steps']} at ε {grid['eps']:g}/255, "
           f"L2 PGD-{grid['pgd_eval_steps']} at ε 0.25",
           f"- kernel motion: analyze_ntk.py dynamics on {grid['dynamics_size']} training images, every checkpoint of "
           f"both phase-1 runs; d(K, K') = 1 − ⟨K, K'⟩ / (‖K‖ ‖K'‖)", ""]
    md += ["## What the grid shows", ""] + claims(grid, rows, finals, epochs) + [""]
    md += ["![accuracy and kernel distance against the kernel epoch](grid.png)", ""]
    md += ["## Summary (mean ± std over seeds)", "",
           "Clean / L∞ PGD accuracy of phase 2 on the kernel of the phase-1 run at epoch e, and the kernel distance "
           "d(K_e, K_T) of that run to its final kernel.", "",
           "| e | d(K_e,K_T) CC | d(K_e,K_T) AC | CC kernel, CC phase 2 | CC kernel, CA phase 2 | AC kernel, CC phase 2 "
           "| AC kernel, CA phase 2 |", "|---|---|---|---|---|---|---|"]
    for e in epochs:
        cols = [_fmt(*_distance_at(dist, k1, e)) for k1 in PHASE1_KINDS]
        for k1 in PHASE1_KINDS:
            for k2 in PHASE2_KINDS:
                sel = [r for r in rows if (r["phase1"], r["phase2"], r["kernel_epoch"]) == (k1, k2, e)]
                cols.append(f"{_fmt(*_mean_std([r['clean'] for r in sel]))} / {_fmt(*_mean_std([r['linf'] for r in sel]))}")
        md.append(f"| {epoch_name(e)} | " + " | ".join(cols) + " |")
    md += ["", "Phase-1 networks at the end of phase 1 (standard dynamics):", "",
           "| phase 1 | clean | L∞ PGD | L2 PGD |", "|---|---|---|---|"]
    for k1 in PHASE1_KINDS:
        sel = [f for f in finals if f["phase1"] == k1]
        md.append(f"| {k1} | " + " | ".join(_fmt(*_mean_std([f[m] for f in sel])) for m in ("clean", "linf", "l2")) + " |")
    md += ["", "## Every cell", "", "| phase 1 (kernel) | phase 2 | kernel epoch | seed | clean | L∞ PGD | L2 PGD |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        vals = [f3(r[m]) for m in ("clean", "linf", "l2")] if r["status"] == "ok" else [r["status"]] * 3
        md.append(f"| {r['phase1']} | {r['phase2']} | {epoch_name(r['kernel_epoch'])} | {r['seed']} | " + " | ".join(vals) + " |")
    md += ["", "## Commands", "", "The whole grid (it skips complete cells, so it also resumes):", "", "```bash",
           grid_command, "```", "",
           "It runs these commands, from the repository root (also in `commands.sh`; `results.json` and "
           "`results.csv` hold every number above):", "", "```bash"] + [c.command() for c in cells] + ["```", ""]
    path = os.path.join(rdir, "report.md")
    utils.atomic_write_bytes(path, "\n".join(md).encode())
    return path


# ======================================================================================
def run(args):
    """Run (or print, or report on) the grid. Returns {'report': path or None, 'failed': [...],
    'ran': [cell names]}."""
    grid = resolve(args)
    cells = make_cells(grid)
    grid_command = shlex.join(["python", script_path(), *grid_flags(grid)])
    if args.print_commands:
        print_commands(grid, cells)
        return {"report": None, "failed": [], "ran": []}
    if args.cell is not None:
        names = [c.name for c in cells]
        if args.cell not in names:
            raise UserError(f"--cell {args.cell} is not a cell of this grid (e.g. {names[0]}, {names[-1]})")
    if os.path.exists(grid["out_dir"]) and not os.path.isdir(grid["out_dir"]):
        raise UserError(f"--out_dir {grid['out_dir']} is a file")
    markers, todo = survey(cells)
    if args.cell is not None:
        cell = next(c for c in cells if c.name == args.cell)
        missing = [d for d in cell.deps if d not in markers]
        if missing:
            raise UserError(f"--cell {cell.name} needs {', '.join(missing)} to be complete: run "
                            f"{'its' if len(missing) == 1 else 'their'} command first")
        todo = [cell] if cell in todo else []
        if not todo:
            print(f"{cell.name} is already complete")
    if args.report_only:
        todo = []
    if todo:
        utils.check_writable_dir(grid["out_dir"], "--out_dir")
    t0, load0 = time.time(), os.getloadavg()
    if todo:
        print(f"{len(cells) - len(todo)} of {len(cells)} cells complete; running {len(todo)} with --jobs {args.jobs}"
              f" (load average {load0[0]:.2f})", flush=True)
    failed = execute(todo, markers, args.jobs, args.no_progress) if todo else []
    wall = time.time() - t0
    if todo:
        load1 = os.getloadavg()
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells_run": len(todo), "failed": len(failed),
                  "jobs": args.jobs, "wall_seconds": round(wall, 1), "load_average_start": list(load0),
                  "load_average_end": list(load1), "cpus": len(os.sched_getaffinity(0)),
                  "argv": sys.argv}
        with open(os.path.join(grid["out_dir"], "grid_runs.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"ran {len(todo)} cells in {wall:.0f} s (load average {load0[0]:.2f} at the start, {load1[0]:.2f} at "
              f"the end)")
    report = None
    if args.cell is None and (markers or args.report_only):
        report = write_report(grid, cells, markers, grid_command)
        print(f"wrote {report}")
    if failed:
        for f in failed:
            print(f"{f['cell']}: {f['status']}: {f['message']}", file=sys.stderr)
        raise UserError(f"{len(failed)} cell{'s' if len(failed) > 1 else ''} did not complete (first: {failed[0]['cell']}: "
                        f"{failed[0]['message']}); rerun the same command to retry them")
    return {"report": report, "failed": failed, "ran": [c.name for c in todo]}


def main(argv=None):
    # This process only checks, schedules and reports: the cells load JAX where they run.
    return utils.run_main(run, build_parser().parse_args(argv), uses_jax=False)


if __name__ == "__main__":
    main()
