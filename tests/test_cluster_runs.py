"""Runs survive what clusters and people do to them: run folders moved or copied elsewhere, two
starts into one --save_path, Ctrl-C and SIGTERM, a disk that filled, interrupted analyses,
contradictory flags, one meaning of --test_size, one-line messages. Tiny digits runs; the scripts
run in this process through cli_harness.call (judged as the command line), or as real processes
where signals and races are the point."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import utils
from cli_harness import TINY, call, offline, verdict
from conftest import ROOT

pytestmark = pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it

RUN = [*TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--constant_save", "--save_models"]
KERNEL = ["--dataset_size", "20", "--class_index", "0", "--no_progress"]
EVAL = ["--test_size", "20", "--pgd_steps", "1", "--no_progress", "--bonus_dir", "evals"]
VIS = ["--steps", "2", "--n_images", "1", "--no_progress", "--bonus_dir", "vis"]
FEATURES = ["features", "--n_train", "10", "--n_test", "10", "--steps", "1", "--n_features", "2", "--n_tail", "1",
            "--no_progress"]


def ok(cwd, script, *argv):
    code, out, err = call(script, list(argv), str(cwd))
    assert code == 0 and verdict(code, err) is None, (script, argv, err[-3000:])
    return out, err


def refused(cwd, script, *argv):
    code, out, err = call(script, list(argv), str(cwd))
    assert code == 2 and verdict(code, err) is None, (script, argv, code, err[-3000:])
    return err.strip()


def analyses(cwd, run):
    """Every command that reads the run in folder `run` (relative to cwd), as a researcher types it."""
    final = f"{run}/parameters_final.pkl"
    return [
        ("calculate_kernel", ["--model_path", final, *KERNEL]),
        ("eval_and_make_adv", ["--model_path", final, *EVAL]),
        ("visualize_ntk_features", ["--model_path", final, "--kernel_path", f"{run}/saved_kernel_class_0_20.pkl",
                                    *VIS]),
        ("analyze_ntk", [*FEATURES, "--model_path", final, "--out_dir", f"{run}/an"]),
        ("analyze_ntk", ["dynamics", "--runs", run, "--dataset_size", "10", "--out_dir", f"{run}/dyn",
                         "--no_progress"]),
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run in `home/run` with every analysis of it done there."""
    home = tmp_path_factory.mktemp("home")
    with offline():
        ok(home, "run_exp", *RUN, "--save_path", "run")
        for script, argv in analyses(home, "run"):
            ok(home, script, *argv)
    return home


# --------------------------------------------------------------------------------------
# 1. a run folder moved or copied is still itself
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["move", "copy"])
def test_a_moved_or_copied_run_folder_recognises_its_own_files(finished, tmp_path, how):
    home, elsewhere = tmp_path / "cluster", tmp_path / "laptop"
    shutil.copytree(str(finished / "run"), str(home / "run"))   # the module's run stays as it was
    (shutil.move if how == "move" else shutil.copytree)(str(home / "run"), str(elsewhere / "run"))
    with offline():
        out, _ = ok(elsewhere, "run_exp", *RUN, "--save_path", "run", "--resume")   # its own run, finished
        assert "had already finished" in out
        for script, argv in analyses(elsewhere, "run")[::-1]:  # every analysis reruns in the new place (the
            # kernel last: its rerun rewrites the file the eigen-images were made from)
            ok(elsewhere, script, *argv)
        # ...while a kernel of another checkpoint under the same name is still refused
        line = refused(elsewhere, "calculate_kernel", "--model_path", "run/parameters_checkpoint_0.pkl", *KERNEL)
        assert "already holds a kernel with --model_path" in line and "parameters_final.pkl" in line


def _interrupt_after(monkeypatch, epochs):
    """Ctrl-C once `epochs` resume records are written (the run stops between two epochs)."""
    import experiment
    real, count = experiment.save_resume, []

    def save_then_interrupt(*a, **k):
        real(*a, **k)
        count.append(1)
        if len(count) == epochs:
            raise KeyboardInterrupt
    monkeypatch.setattr(experiment, "save_resume", save_then_interrupt)


def test_a_half_finished_run_moved_elsewhere_resumes_there(tmp_path, monkeypatch):
    run = [*TINY, "--standard_epochs", "3", "--linear_epochs", "0", "--save_models"]
    with offline():
        _interrupt_after(monkeypatch, 1)
        code, out, err = call("run_exp", [*run, "--save_path", "a"], str(tmp_path))
        assert code == 130 and err.strip().splitlines() == [
            "interrupted (Ctrl-C): phase 1 stopped at epoch 1 (the last completed epoch is saved); continue with the "
            "same command and --resume"]
        monkeypatch.undo()
        shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
        out, _ = ok(tmp_path, "run_exp", *run, "--save_path", "b", "--resume")
    assert "resuming phase 1 at epoch 1" in out
    assert os.path.isfile(tmp_path / "b" / "parameters_final.pkl")


def test_a_moved_grid_runs_nothing_again(tmp_path):
    tiny = ["--preset", "digits", "--phase1_epochs", "1", "--kernel_epochs", "0", "--seeds", "0", "--model",
            "mlp_skinny", "--train_size", "40", "--test_size", "20", "--pgd_eval_steps", "1", "--dynamics_size", "10",
            "--no_progress"]
    first = subprocess.run([sys.executable, "kernel_epoch_grid.py", *tiny, "--out_dir", str(tmp_path / "g")], cwd=ROOT,
                           capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.move(str(tmp_path / "g"), str(tmp_path / "moved"))
    again = subprocess.run([sys.executable, "kernel_epoch_grid.py", *tiny, "--out_dir", str(tmp_path / "moved")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "running" not in again.stdout, again.stdout + again.stderr


# --------------------------------------------------------------------------------------
# 2. two starts into one --save_path: one runs, the other is refused naming it
# --------------------------------------------------------------------------------------
def test_two_runs_started_together_into_one_save_path(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "run_exp.py"), *TINY, "--standard_epochs", "200", "--linear_epochs", "0",
           "--save_path", "same"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    assert len(loser[1].strip().splitlines()) == 1
    assert loser[1].startswith("error: --save_path same is in use by PID ") and ", started 20" in loser[1]
    records = [json.loads(line) for line in open(tmp_path / "same" / "metrics.jsonl")]
    epochs = [r["epoch"] for r in records if r.get("event") == "epoch"]
    assert epochs == list(range(200))   # every epoch once: nothing interleaved
    assert not os.path.exists(tmp_path / "same" / utils.LOCK_FILE)   # released with the run


def test_a_grid_cell_run_twice_at_once_is_refused(tmp_path):
    import grid_scheduler
    cell = {"name": "phase1/CC_s0", "dir": str(tmp_path / "cell"), "script": "run_exp", "argv": []}
    holder = subprocess.Popen([sys.executable, "-c", f"import utils, time; utils.lock_dir({cell['dir']!r}); "
                               f"print('locked', flush=True); time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        status = grid_scheduler.run_cell(cell, {})
    finally:
        holder.kill()
        holder.wait()
    assert status["status"] == "failed" and "is in use by PID" in status["message"], status


# --------------------------------------------------------------------------------------
# 3. the trained model is not lost silently; --resume may change output flags
# --------------------------------------------------------------------------------------
def test_no_save_models_is_said_at_the_start_and_resume_may_add_it(tmp_path, monkeypatch):
    run = [*TINY, "--standard_epochs", "2", "--linear_epochs", "0", "--save_path", "r"]
    with offline():
        _interrupt_after(monkeypatch, 1)
        code, out, _ = call("run_exp", run, str(tmp_path))
        assert code == 130
        assert out.splitlines()[0] == ("note: without --save_models no parameters_final.pkl is written: add it to keep "
                                       "the trained network")
        monkeypatch.undo()
        ok(tmp_path, "run_exp", *run, "--resume", "--save_models")
    assert os.path.isfile(tmp_path / "r" / "parameters_final.pkl")


# --------------------------------------------------------------------------------------
# 4. an interrupted analysis (a grid's kernel-motion cell) reruns as it was
# --------------------------------------------------------------------------------------
def test_an_analysis_interrupted_before_its_record_reruns(finished, monkeypatch):
    import analyze_ntk
    argv = ["dynamics", "--runs", "run", "--dataset_size", "10", "--out_dir", "cut", "--no_progress"]
    real = utils.atomic_json

    def interrupted(path, obj):
        if path.endswith("dynamics.json"):
            raise KeyboardInterrupt
        real(path, obj)
    monkeypatch.setattr(analyze_ntk.utils, "atomic_json", interrupted)
    code, _, err = call("analyze_ntk", argv, str(finished))
    assert code == 130 and err.strip() == "interrupted (Ctrl-C)"
    monkeypatch.undo()
    assert os.path.isfile(finished / "cut" / "kernel_distance_run.png")
    assert not os.path.exists(finished / "cut" / "dynamics.json")
    line = refused(finished, "analyze_ntk", *argv, "--k", "3")
    assert "already holds a kernel-dynamics analysis with --k 10, not 3" in line
    ok(finished, "analyze_ntk", *argv)   # the same inputs: what the interrupted call left is replaced
    assert os.path.isfile(finished / "cut" / "dynamics.json")
    assert not os.path.exists(finished / "cut" / ".dynamics.json.inputs.json")


# --------------------------------------------------------------------------------------
# 5. Ctrl-C and SIGTERM: one line, 130 and 143, the last epoch kept
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_ends_a_run_with_one_line_and_it_resumes(tmp_path, sig, code, name):
    cmd = [sys.executable, os.path.join(ROOT, "run_exp.py"), *TINY, "--standard_epochs", "100000", "--linear_epochs",
           "0", "--save_path", "long"]
    metrics = tmp_path / "long" / "metrics.jsonl"
    for attempt in (cmd, cmd + ["--resume"]):
        before = metrics.read_text().count("\n") if metrics.exists() else 0
        p = subprocess.Popen(attempt, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300   # a few epochs of this attempt, then the signal
        while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < before + 3):
            time.sleep(0.2)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert p.returncode == code, err[-3000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"interrupted ({name}): phase 1 stopped at epoch "), err
        assert lines[0].endswith("(the last completed epoch is saved); continue with the same command and --resume")
        assert "Traceback" not in out + err
    assert "resuming phase 1 at epoch" in out


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_a_signal_to_an_experiment_stops_its_worker_processes(tmp_path):
    """SIGTERM to tk_experiment.py --jobs 2 alone (not to its process group): the cells running in its
    workers stop too, at once, and it ends with exit 143 and its one line."""
    cmd = [sys.executable, os.path.join(ROOT, "tk_experiment.py"), "--archs", "fc1", "--widths", "8", "16",
           "--train_epochs", "100000", "--train_size", "40", "--test_size", "20", "--tasks", "binary", "--jobs", "2",
           "--no_progress", "--out_dir", "tk"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = [tmp_path / "tk" / "finite" / f"fc1_w{w}" / "metrics.jsonl" for w in (8, 16)]
    deadline = time.time() + 300
    while time.time() < deadline and not all(m.exists() and m.read_text().count("epoch") >= 2 for m in metrics):
        time.sleep(0.2)
    workers = _children(p.pid)
    assert len(workers) >= 2
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-3000:]
    assert err.strip().splitlines() == ["interrupted (SIGTERM): the complete cells are kept; rerun the same command "
                                        "to run the others"], err
    time.sleep(1)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "zombie" not in
                open(f"/proc/{w}/status").read()], "a worker process outlived its experiment"


# --------------------------------------------------------------------------------------
# 6. "finished" only for a run that wrote its final files
# --------------------------------------------------------------------------------------
def test_a_run_whose_disk_filled_is_unfinished_not_finished(tmp_path, monkeypatch):
    import experiment

    def disk_full(*a, **k):
        raise utils.UserError("cannot write r/resume.pkl: disk full; previous files were kept")
    run = [*TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--save_path", "r"]
    with offline():
        monkeypatch.setattr(experiment, "save_resume", disk_full)
        assert refused(tmp_path, "run_exp", *run) == "error: cannot write r/resume.pkl: disk full; previous files were kept"
        monkeypatch.undo()
        line = refused(tmp_path, "run_exp", *run)
        assert "holds an unfinished run with these flags whose resume.pkl is missing or unreadable" in line
        ok(tmp_path, "run_exp", *run, "--save_path", "t")
        with open(tmp_path / "t" / "resume.pkl", "r+b") as f:   # a resume record cut short
            f.truncate(100)
        line = refused(tmp_path, "run_exp", *run[:-1], "t")
        assert "holds an unfinished run" in line and "finished run" not in line.replace("unfinished", "")


def test_a_real_full_disk_keeps_the_previous_files(tmp_path):
    """A 1 MiB tmpfs, where the platform lets this process mount one (root on Linux); else skipped."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        with offline():
            code, out, err = call("run_exp", [*TINY, "--model", "mlp_wide", "--standard_epochs", "1", "--linear_epochs",
                                              "0", "--save_models", "--save_path", "run"], str(disk))
            assert code == 2 and verdict(code, err) is None and "disk full; previous files were kept" in err, err
            line = refused(disk, "run_exp", *TINY, "--model", "mlp_wide", "--standard_epochs", "1", "--linear_epochs",
                           "0", "--save_models", "--save_path", "run")
            assert "holds an unfinished run" in line
    finally:
        subprocess.run(["umount", str(disk)])


# --------------------------------------------------------------------------------------
# 7. contradictory or absurd flags
# --------------------------------------------------------------------------------------
def test_absurd_eps_is_refused_and_ignored_flags_are_named(finished, tmp_path):
    with offline():
        assert refused(tmp_path, "run_exp", *TINY, "--eps", "1e9", "--save_path", "x") == (
            "error: --eps is in 1/255 units (8 means 8/255) and must lie in [0, 255] (got 1000000000.0)")
        assert refused(finished, "eval_and_make_adv", "--model_path", "run/parameters_final.pkl", "--eps", "300"
                       ).startswith("error: --eps is in 1/255 units")
        base = str(finished / "run" / "parameters_final.pkl")
        out, err = ok(tmp_path, "run_exp", *TINY, "--base_model_path", base, "--standard_epochs", "5",
                      "--linear_epochs", "1", "--save_path", "p2")
        assert "warning: --standard_epochs is ignored with --base_model_path: phase 1 is that checkpoint" in err
        out, err = ok(tmp_path, "run_exp", *TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--centering",
                      "--constant_save_linear", "--save_path", "p1")
    assert err.count("\n") == 2 and "warning: --centering is ignored with --linear_epochs 0" in err
    assert "warning: --constant_save_linear is ignored with --linear_epochs 0" in err
    assert "the constant saves are in" not in out   # there are none


# --------------------------------------------------------------------------------------
# 8. --test_size: one subset in every script
# --------------------------------------------------------------------------------------
def test_test_size_is_the_same_subset_in_run_exp_and_eval(finished):
    results = json.loads((finished / "run" / "results.json").read_text())
    summary = json.loads((finished / "run" / "evals" / "test_results_test_results.json").read_text())
    assert summary["test_subset"] == {"size": 20, "seed": 0, "kind": "seeded class-balanced"}
    assert summary["acc_clean"] == pytest.approx(results["standard"]["clean"])


# --------------------------------------------------------------------------------------
# 9. every message one line, warnings once
# --------------------------------------------------------------------------------------
def test_a_png_given_as_a_pickle_is_one_line(finished):
    png = "run/vis/ntk_eig_images_class_0_20.png"
    assert os.path.isfile(finished / png)
    for script, argv in (("eval_and_make_adv", ["--model_path", png]),
                         ("visualize_ntk_features", ["--model_path", "run/parameters_final.pkl", "--kernel_path", png])):
        assert refused(finished, script, *argv).startswith(f"error: {png} is corrupt or truncated")


def test_the_checksum_warning_is_one_line_once_per_folder(tmp_path):
    from test_data import write_tiny_cifar10
    write_tiny_cifar10(tmp_path)
    code = ("import data\nfor _ in range(3):\n    data.load_dataset('cifar10', %r, download=False)\n" % str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"warning: cifar10 files in {tmp_path}/cifar-10-batches-py do not match the published "
                               f"md5 sums (data_batch_1, ") and lines[0].endswith("): not the canonical set")
