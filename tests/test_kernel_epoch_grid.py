"""kernel_epoch_grid.py end to end on a tiny grid (digits, an MLP, 1 phase-1 epoch, kernel epochs 0
and 0.5, one seed): killed mid-grid and resumed with --jobs 2, only the missing cells run; the
--print_commands lines, run one by one, give the same report; a new kernel epoch adds only its
cells; bad input is one line before any run."""
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it

sys.path.insert(0, ROOT)

TINY = ["--preset", "digits", "--phase1_epochs", "1", "--kernel_epochs", "0", "0.5", "--seeds", "0",
        "--model", "mlp_skinny", "--train_size", "100", "--test_size", "50", "--pgd_eval_steps", "2",
        "--dynamics_size", "20", "--no_progress"]
N_CELLS = 2 + 2 * 2 * 2 + 1   # phase-1 CC/AC, phase 2 {CC,AC} x {0,0.5} x {CC,CA}, one dynamics


def grid(out, *extra):
    return [sys.executable, "kernel_epoch_grid.py", *TINY, "--out_dir", str(out), *extra]


def markers(out):
    """cell name -> run_id of every complete cell under `out`."""
    found = {}
    for path in glob.glob(os.path.join(out, "**", "grid_cell.json"), recursive=True):
        with open(path) as f:
            m = json.load(f)
        found[m["cell"]] = m["run_id"]
    return found


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The tiny grid with --jobs 2, killed (SIGKILL to its process group) as soon as both phase-1 runs and a
    phase-2 cell are complete, then run again. Returns (out_dir, markers before the rerun, rerun's stdout)."""
    out = tmp_path_factory.mktemp("grid") / "g"
    log = open(out.parent / "first.log", "w")
    p = subprocess.Popen(grid(out, "--jobs", "2"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.time() + 3600
    try:
        while time.time() < deadline and p.poll() is None:
            done = markers(out)
            # both phase-1 runs and a phase-2 cell: with --jobs 2 the first phase-2 cell can complete
            # while the other phase-1 run is still training
            if {"phase1/CC_s0", "phase1/AC_s0"} <= set(done) and any(n.startswith("phase2/") for n in done):
                break
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    before = markers(out)
    r = subprocess.run(grid(out, "--jobs", "2"), cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, before, r.stdout


def test_killed_grid_resumes_only_the_missing_cells(killed_and_resumed):
    out, before, stdout = killed_and_resumed
    assert 3 <= len(before) < N_CELLS, before   # both phase-1 runs and a phase-2 cell, not everything
    after = markers(out)
    assert len(after) == N_CELLS
    # complete cells were kept as they were (same run), the others ran exactly once
    assert {k: after[k] for k in before} == before
    assert f"{len(before)} of {N_CELLS} cells complete; running {N_CELLS - len(before)} with --jobs 2" in stdout
    ran = {line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("[")}
    assert ran == set(after) - set(before)
    report = (out / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| CC | C", "| AC | C"))]
    assert len(rows) == 8 and not any("n/a" in r or "missing" in r for r in rows)
    assert "Consistent with the claim" in report or "Not consistent with the claim" in report
    assert os.path.getsize(out / "report" / "grid.png") > 10_000
    res = json.loads((out / "report" / "results.json").read_text())
    assert {r["kernel_epoch"] for r in res["phase2"]} == {0.0, 0.5}
    assert all(0 <= r[m] <= 1 for r in res["phase2"] for m in ("clean", "linf", "l2"))
    # epoch 0 is the initialization, the same network for CC and AC with one seed: the same phase 2
    e0 = {(r["phase1"], r["phase2"]): (r["clean"], r["linf"], r["l2"]) for r in res["phase2"] if r["kernel_epoch"] == 0}
    assert e0[("CC", "CC")] == e0[("AC", "CC")] and e0[("CC", "CA")] == e0[("AC", "CA")]
    # a second run finds everything complete and runs nothing
    r = subprocess.run(grid(out, "--jobs", "2"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "running" not in r.stdout and markers(out) == after


def test_printed_commands_run_line_by_line_give_the_same_report(killed_and_resumed, tmp_path, monkeypatch):
    """Each printed line is `python kernel_epoch_grid.py ... --cell NAME`; they are run here one after the
    other through the script's main() (the same code path as the shell, minus interpreter start-up)."""
    import grid_cells
    import kernel_epoch_grid
    out, _, _ = killed_and_resumed
    out2 = tmp_path / "g2"
    r = subprocess.run(grid(out2, "--print_commands"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not out2.exists()   # printing runs nothing
    lines = [line for line in r.stdout.splitlines() if line and not line.startswith("#")]
    cells = [shlex.split(line)[-1] for line in lines[:-1]]
    assert len(cells) == N_CELLS and cells[:2] == ["phase1/CC_s0", "phase1/AC_s0"]
    assert lines[-1].endswith("--report_only")
    monkeypatch.chdir(ROOT)
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "kernel_epoch_grid.py"]
        kernel_epoch_grid.main(argv[2:])
    assert set(markers(out2)) == set(markers(out))
    same = (out / "report" / "report.md").read_text()
    got = (out2 / "report" / "report.md").read_text().replace(str(out2), str(out))
    assert got == same
    # a new kernel epoch: only its four phase-2 cells are left to run
    args = kernel_epoch_grid.build_parser().parse_args(
        [*TINY, "--out_dir", str(out2), "--kernel_epochs", "0", "0.5", "1"])
    s = kernel_epoch_grid.resolve(args)
    _, todo = grid_cells.survey(grid_cells.make_cells(s))
    assert sorted(c.name for c in todo) == sorted(f"phase2/{k1}_s0/e1_{k2}" for k1 in ("CC", "AC") for k2 in ("CC", "CA"))


def one_line_error(cmd, cwd=ROOT):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_bad_input_is_one_line_before_any_run(tmp_path):
    out = tmp_path / "g"
    base = [sys.executable, "kernel_epoch_grid.py", "--out_dir", str(out)]
    assert "unknown preset 'cifar'" in one_line_error(base + ["--preset", "cifar"])
    msg = one_line_error(base + ["--kernel_epochs", "0", "0.3"])
    assert "--kernel_epochs 0.3" in msg and "saves no checkpoint" in msg
    msg = one_line_error(base + ["--kernel_epochs", "25"])   # the digits preset trains 20 epochs
    assert "--kernel_epochs 25" in msg
    msg = one_line_error(base + ["--preset", "cifar-subset", "--data_dir", str(tmp_path)])
    assert f"--data_dir {tmp_path} holds no cifar10" in msg
    assert "--cell nope" in one_line_error(base + ["--cell", "nope"])
    assert not out.exists()


def test_finished_cell_with_other_flags_is_refused(killed_and_resumed):
    out, _, _ = killed_and_resumed
    before = markers(out)
    msg = one_line_error(grid(out, "--eps", "16"))
    assert "holds a finished run made with --eps 32.0" in msg and "use another --out_dir" in msg
    assert markers(out) == before


def test_cpu_shares_split_the_cpus():
    import grid_scheduler
    cpus = sorted(os.sched_getaffinity(0))
    shares = grid_scheduler.cpu_shares(min(2, len(cpus)))
    assert sorted(c for s in shares for c in s) == cpus if len(cpus) >= 2 else len(shares) == 1
    assert all(s for s in grid_scheduler.cpu_shares(len(cpus) + 1))


def _workers(pid):
    """PIDs of the grid's worker processes (spawned interpreters running cells)."""
    out = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                out.append(int(child))
    return out


def test_a_worker_that_dies_is_replaced_and_its_cell_runs_again(tmp_path):
    """A worker process killed (as a crash or the out-of-memory killer would) while it runs a cell:
    the grid starts new workers, runs that cell again and finishes every cell, exit status 0."""
    out = tmp_path / "g"
    p = subprocess.Popen(grid(out, "--jobs", "2"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not any(n.startswith("phase2/") for n in markers(out)):
            time.sleep(0.1)
        victims = _workers(p.pid)
        assert victims, "no worker process found"
        os.kill(victims[0], signal.SIGKILL)
        stdout, _ = p.communicate(timeout=1800)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, stdout[-3000:]
    assert "its worker process died; it runs again" in stdout and "Traceback" not in stdout
    assert len(markers(out)) == N_CELLS
