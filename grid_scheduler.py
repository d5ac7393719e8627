"""Running the cells of kernel_epoch_grid.py: one cell through its script's run(args), its output
in its grid_cell.log and its marker grid_cell.json written when it completes (run_cell, also the
entry point of the worker processes); and the schedule that runs every cell once the cells it
needs are complete, longest first, in this process (--jobs 1) or in N worker processes each pinned
to its share of the CPUs, with new workers when one dies. An incomplete run_exp cell continues
from its resume.pkl when that was written with the same flags, else it starts again in an emptied
directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
import uuid

import utils
from grid_cells import LOG, MARKER, json_equal, read_json, survey
from utils import UserError

# Relative cost of each kind of cell, for longest-first scheduling among ready cells (kernel_epoch_grid.py's
# cells, then tk_experiment.py's, whose cells also carry their architecture's weight in coords['weight']).
COST = {"phase1:AC": 100, "phase2:CA": 30, "dynamics": 20, "phase1:CC": 15, "phase2:CC": 10,
        "tk:features": 20, "tk:attack_pgd": 12, "tk:attack_fgsm": 2, "tk:finite": 10, "tk:motion": 5,
        "tk:train": 10, "tk:full_dynamics": 10}


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
            if saved is not None and json_equal({k: v for k, v in saved.items() if k not in free},
                                                 {k: v for k, v in expected.items() if k not in free}):
                return ["--resume"]
        for name in set(os.listdir(spec["dir"])) - {utils.LOCK_FILE}:   # the cell's lock stays: run_cell holds it
            path = os.path.join(spec["dir"], name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
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
        utils.lock_dir(spec["dir"], f"the directory of cell {spec['name']}")   # one process per cell
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
    except UserError as e:   # the cell's directory is another process's (lock_dir)
        status["message"] = str(e)
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
    utils.unlock_dir(spec["dir"])   # after the marker: no other process can start a cell that is complete
    return status


# ======================================================================================
# An experiment of cells (kernel_epoch_grid.py, tk_experiment.py)
# ======================================================================================
def run_experiment(out_dir, cells, args, write_report):
    """Run an experiment's cells that are not complete (all, or only --cell), then write its
    report with write_report(markers) -> path (unless --cell; with --report_only nothing runs).
    Returns {'report': path or None, 'failed': [...], 'ran': [cell names]}; UserError if a cell
    failed (after the report of the others)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file")
    names = [c.name for c in cells]
    if args.cell is not None and args.cell not in names:
        raise UserError(f"--cell {args.cell} is not a cell of this experiment (e.g. {names[0]}, {names[-1]})")
    markers, todo = survey(cells)
    if args.cell is not None:
        cell = cells[names.index(args.cell)]
        missing = [d for d in cell.deps if d not in markers]
        if missing:
            raise UserError(f"--cell {cell.name} needs {', '.join(missing)} to be complete: run "
                            f"{'its' if len(missing) == 1 else 'their'} command first")
        todo = [cell] if cell in todo else []
        if not todo:
            print(f"{cell.name} is already complete")
    if args.report_only:
        todo = []
    if todo and args.cell is None:   # one experiment per --out_dir (its cells are locked one by one where they run)
        utils.lock_dir(out_dir, "--out_dir")
    failed = run_cells(out_dir, todo, len(cells), markers, args.jobs, args.no_progress) if todo else []
    report = None
    if args.cell is None and (markers or args.report_only):
        report = write_report(markers)
        print(f"wrote {report}")
    if failed:
        for f in failed:
            print(f"{f['cell']}: {f['status']}: {f['message']}", file=sys.stderr)
        raise UserError(f"{len(failed)} cell{'s' if len(failed) > 1 else ''} did not complete (first: {failed[0]['cell']}: "
                        f"{failed[0]['message']}); rerun the same command to retry them")
    return {"report": report, "failed": failed, "ran": [c.name for c in todo]}


# ======================================================================================
# The schedule
# ======================================================================================
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


def run_cells(out_dir, cells, n_cells, markers, jobs, no_progress):
    """execute() `cells` (the n_cells - len(cells) others are complete) with a line before and after,
    and a record of the run appended to out_dir/grid_runs.jsonl. Returns the failure statuses."""
    utils.check_writable_dir(out_dir, "--out_dir")
    t0, load0 = time.time(), os.getloadavg()
    print(f"{n_cells - len(cells)} of {n_cells} cells complete; running {len(cells)} with --jobs {jobs}"
          f" (load average {load0[0]:.2f})", flush=True)
    failed = execute(cells, markers, jobs, no_progress)
    wall = time.time() - t0
    load1 = os.getloadavg()
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells_run": len(cells), "failed": len(failed),
              "jobs": jobs, "wall_seconds": round(wall, 1), "load_average_start": list(load0),
              "load_average_end": list(load1), "cpus": len(os.sched_getaffinity(0)),
              "argv": sys.argv}
    with open(os.path.join(out_dir, "grid_runs.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"ran {len(cells)} cells in {wall:.0f} s (load average {load0[0]:.2f} at the start, {load1[0]:.2f} at "
          f"the end)")
    return failed


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
            self.markers[cell.name] = read_json(os.path.join(cell.dir, MARKER))
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
        return sorted(out, key=lambda c: -COST[c.kind] * c.coords.get("weight", 1))

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
            try:
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
            except BaseException:   # Ctrl-C, SIGTERM, a bug: the running cells stop with this process
                _stop_workers(pool)
                raise
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


def _stop_workers(pool, grace=20):
    """End a pool's workers now: Ctrl-C in each (its cell stops, unfinished, and the worker exits as
    Python does, releasing what it holds), then SIGTERM to any still running after `grace` seconds."""
    import signal
    workers = list(pool._processes.values())
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGINT)
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.time() + grace
    for w in workers:
        w.join(max(deadline - time.time(), 0))
        if w.is_alive():
            w.terminate()
            w.join()
    # With every worker gone, wait for the pool's management thread, so that its queues (and their
    # semaphores) are released before this process exits: no "leaked semaphore" warning.
    pool.shutdown(wait=True)


def summary_line(cell, st):
    if st["status"] == "diverged":
        return "diverged (non-finite loss)"
    res = read_json(cell.result_file) or {}
    predictor = res.get("full_predictor") or res.get("kernel_predictor")   # analyze_ntk features, attack
    if predictor is not None:
        return f"kernel predictor clean {predictor['acc_clean']:.3f}  {res['method']} {predictor['acc_robust']:.3f}"
    if cell.script == "analyze_ntk":
        return "kernel motion done"
    r = res.get("linear" if cell.kind.startswith("phase2") else "standard", {})
    return f"clean {r.get('clean', float('nan')):.3f}  linf {r.get('linf', float('nan')):.3f}  " \
           f"l2 {r.get('l2', float('nan')):.3f}"
