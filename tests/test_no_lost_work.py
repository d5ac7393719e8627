"""Nothing a user types loses work or prints a traceback: a directory where a file is expected,
failing runs that would leave empty output folders, outputs of other inputs that would be
replaced (run_exp.py's --save_path, calculate_kernel.py's kernel name, eval_and_make_adv.py,
visualize_ntk_features.py and analyze_ntk.py outputs), argparse errors, and run_exp.py's last
lines. Every script runs in this process through cli_harness.call, judged as the command line."""
import os

import numpy as np
import pytest

import utils
from cli_harness import TINY, Scratch, call, offline, snapshot, verdict
from utils import UserError

pytestmark = pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it

FINAL = "run/parameters_final.pkl"
KERNEL = "run/kernels/fixture_class_0_20.pkl"


@pytest.fixture(scope="module")
def scratch_dir(tmp_path_factory):
    with offline():
        yield Scratch(str(tmp_path_factory.mktemp("lost")))


@pytest.fixture
def sc(scratch_dir):
    scratch_dir.restore()
    return scratch_dir


def dirs(d):
    return sorted(root for root, _, _ in os.walk(d))


def ok(sc, script, *argv):
    """The call succeeds (exit 0, no traceback). Returns its stdout."""
    code, out, err = call(script, list(argv), sc.dir)
    assert code == 0 and verdict(code, err) is None, (script, argv, err[-3000:])
    return out


def refused(sc, script, *argv):
    """The call exits 2 with one line on stderr and changes, adds and creates nothing (no file,
    no folder). Returns the line."""
    files, folders = snapshot(sc.dir), dirs(sc.dir)
    code, out, err = call(script, list(argv), sc.dir)
    assert code == 2 and verdict(code, err) is None, (script, argv, code, err[-3000:])
    assert snapshot(sc.dir) == files, "a file changed"
    assert dirs(sc.dir) == folders, f"folders created: {sorted(set(dirs(sc.dir)) - set(folders))}"
    return err.strip()


# --------------------------------------------------------------------------------------
# A directory where a file is expected
# --------------------------------------------------------------------------------------
RUN_HINT = "is a directory, not a checkpoint file (did you mean run/parameters_final.pkl?)"
DIRECTORIES = {
    "eval-model_path": ("eval_and_make_adv", ["--model_path", "run"], f"--model_path run {RUN_HINT}"),
    "kernel-model_path": ("calculate_kernel", ["--model_path", "run", "--dataset_size", "20"],
                          f"--model_path run {RUN_HINT}"),
    "visualize-kernel_path": ("visualize_ntk_features", ["--model_path", FINAL, "--kernel_path", "run/kernels"],
                              "--kernel_path run/kernels is a directory, not a kernel file (did you mean "
                              "run/kernels/fixture_class_0_20.pkl?)"),
    "eval-test_path": ("eval_and_make_adv", ["--model_path", FINAL, "--test_path", "run/evals"],
                       "--test_path run/evals is a directory, not a pickle of images and labels (did you mean "
                       "run/evals/adv_examples_fixture.pkl?)"),
    "run_exp-base_model_path": ("run_exp", [*TINY, "--base_model_path", "run", "--save_path", "new"],
                                f"--base_model_path run {RUN_HINT}"),
    "features-model_path": ("analyze_ntk", ["features", "--model_path", "run"], f"--model_path run {RUN_HINT}"),
    "dynamics-kernel_files": ("analyze_ntk", ["dynamics", "--kernel_files", "emptydir", KERNEL],
                              "--kernel_files emptydir is a directory, not a kernel file"),
    "empty-directory": ("eval_and_make_adv", ["--model_path", "emptydir"],
                        "--model_path emptydir is a directory, not a checkpoint file"),
}


@pytest.mark.parametrize("case", list(DIRECTORIES))
def test_a_directory_for_a_file_is_named_as_one(sc, case):
    script, argv, message = DIRECTORIES[case]
    assert refused(sc, script, *argv) == "error: " + message


# --------------------------------------------------------------------------------------
# Failing runs leave no empty output folders
# --------------------------------------------------------------------------------------
def _fail_in(monkeypatch, module, name):
    """Make `module.name` raise a UserError: a failure in the middle of the work."""
    import importlib
    mod = importlib.import_module(module)

    def boom(*a, **k):
        raise UserError("planted failure")
    monkeypatch.setattr(mod, name, boom)


FAILURES = {  # id: (script, argv, what to break (or None: the input itself is bad), new folder)
    "eval-bonus_dir": ("eval_and_make_adv", ["--model_path", FINAL, "--bonus_dir", "new/eval", "--test_size", "20",
                                             "--pgd_steps", "1", "--no_progress"], ("attacks", "evaluate"),
                       "run/new"),
    "kernel-bonus_dir": ("calculate_kernel", ["--model_path", FINAL, "--dataset_size", "20", "--bonus_dir", "new",
                                              "--no_progress"], ("ntk", "empirical_ntk"), "run/new"),
    "visualize-bonus_dir": ("visualize_ntk_features", ["--model_path", FINAL, "--kernel_path", KERNEL, "--steps", "2",
                                                       "--n_images", "1", "--bonus_dir", "new", "--no_progress"],
                            ("visualize_ntk_features", "draw_images"), "run/new"),
    "features-out_dir-bad-n_train": ("analyze_ntk", ["features", "--model_path", FINAL, "--n_train", "3",
                                                     "--out_dir", "new/an"], None, "new"),
    "features-default-out_dir": ("analyze_ntk", ["features", "--model_path", FINAL, "--n_train", "10", "--n_test",
                                                 "10", "--no_progress"], ("ntk", "reference_kernel"), "run/ntk_analysis"),
    "attack-out_dir": ("analyze_ntk", ["attack", "--model_path", FINAL, "--n_train", "10", "--n_test", "10",
                                       "--out_dir", "new", "--no_progress"], ("kernel_analysis", "fit_kernel_predictor"),
                       "new"),
    "dynamics-out_dir": ("analyze_ntk", ["dynamics", "--runs", "mini", "--dataset_size", "10", "--out_dir", "new",
                                         "--no_progress"], ("ntk", "empirical_ntk"), "new"),
    "run_exp-save_path-bad-base": ("run_exp", [*TINY, "--base_model_path", "truncated.pkl", "--save_path", "new/run"],
                                   None, "new"),
    "run_exp-save_path-offline": ("run_exp", ["--dataset", "cifar10", "--data_dir", "nodata", "--no_progress",
                                              "--save_path", "new/run"], None, "new"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failing_run_leaves_no_empty_folder(sc, case, monkeypatch):
    script, argv, broken, folder = FAILURES[case]
    if broken:
        _fail_in(monkeypatch, *broken)
    refused(sc, script, *argv)
    assert not os.path.exists(os.path.join(sc.dir, folder))
    assert not os.path.exists(os.path.join(sc.dir, "nodata"))


def test_writable_check_creates_nothing_and_names_what_is_in_the_way(tmp_path):
    (tmp_path / "a_file").write_text("x")
    utils.check_writable_dir(str(tmp_path / "new" / "deeper"))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    with pytest.raises(UserError, match=r"^--out_dir .*a_file/sub is not writable: Not a directory$"):
        utils.check_writable_dir(str(tmp_path / "a_file" / "sub"), "--out_dir")
    with pytest.raises(UserError, match=r"^--out_dir .*a_file is not writable: Not a directory$"):
        utils.check_writable_dir(str(tmp_path / "a_file"), "--out_dir")
    with pytest.raises(UserError, match=r"^--save_path is empty"):
        utils.check_writable_dir("")


# --------------------------------------------------------------------------------------
# run_exp.py: one run per --save_path
# --------------------------------------------------------------------------------------
# The fixture's run: TINY with --random_seed 12345, 1 epoch, --linear_epochs 0, --constant_save --save_models.
FIXTURE_RUN = [*TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--random_seed", "12345", "--save_path", "run"]


def test_run_exp_refuses_a_save_path_holding_another_run(sc):
    line = refused(sc, "run_exp", *TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--eps", "8",
                   "--save_path", "run")
    assert line == ("error: --save_path run holds another run (mlp_skinny on digits, --loaders CC, 1+0 epochs; it "
                    "used --eps 4.0, not 8.0): to continue it, rerun its own command with --resume; or give another "
                    "--save_path, or add --overwrite to delete its files first")


def test_run_exp_overwrite_deletes_the_old_runs_files_only(sc):
    run = os.path.join(sc.dir, "run")
    old_checkpoints = sorted(f for f in os.listdir(run) if f.startswith("parameters_checkpoint_"))
    assert len(old_checkpoints) == 7
    out = ok(sc, "run_exp", *TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--eps", "8", "--save_models",
             "--save_path", "run", "--overwrite")
    assert "--overwrite: deleted 13 files of the previous run in run; kept evals, kernels, vis" in out
    names = sorted(os.listdir(run))
    assert not [f for f in names if f.startswith("parameters_checkpoint_")]  # no mix of two runs
    assert {"evals", "kernels", "vis", "parameters_final.pkl", "config.json"} <= set(names)
    assert utils.restricted_load(os.path.join(run, "resume.pkl"))["args"]["eps"] == 8.0


def test_run_exp_same_run_may_be_rerun_but_an_unfinished_one_is_resumed(sc):
    # the fixture's own flags, now also without --constant_save: the same run, its files replaced
    out = ok(sc, "run_exp", *FIXTURE_RUN, "--save_models")
    assert "holds a finished run with the same flags: its files are replaced" in out
    # the same flags over an unfinished run: refused, --resume named
    progress_file = os.path.join(sc.dir, "run", "resume.pkl")
    resume = utils.restricted_load(progress_file)
    resume["progress"]["phase"], resume["progress"]["epoch"] = 1, 0
    utils.atomic_pickle(progress_file, resume)
    line = refused(sc, "run_exp", *FIXTURE_RUN)
    assert line == ("error: --save_path run holds an unfinished run with these flags (stopped in phase 1 at epoch 0): "
                    "continue it with --resume, or add --overwrite to start it again")


def test_run_exp_refuses_files_without_a_record_and_contradicting_flags(sc):
    os.makedirs(os.path.join(sc.dir, "bare"))
    utils.atomic_write_bytes(os.path.join(sc.dir, "bare", "parameters_final.pkl"), b"x")
    line = refused(sc, "run_exp", *TINY, "--save_path", "bare")
    assert line == ("error: --save_path bare holds the files of a run (parameters_final.pkl) that record no flags: "
                    "give another --save_path, or add --overwrite to delete them first")
    assert refused(sc, "run_exp", *TINY, "--save_path", "run", "--resume", "--overwrite") == (
        "error: --resume continues the run in --save_path and --overwrite deletes it: give one of them")
    line = refused(sc, "run_exp", *TINY, "--base_model_path", "run/parameters_checkpoint_1.pkl", "--save_path", "run",
                   "--overwrite")
    assert line == ("error: --overwrite would delete --base_model_path run/parameters_checkpoint_1.pkl, which is in "
                    "--save_path run: give another --save_path")


def test_run_exp_ends_with_a_table_and_says_when_no_checkpoint_was_written(sc):
    out = ok(sc, "run_exp", *TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--save_path", "fresh")
    lines = out.strip().splitlines()
    assert lines[-4:-1] == ["accuracy   clean    L-inf PGD  L2 PGD", lines[-3], "phase 2    not evaluated"]
    assert lines[-3].startswith("phase 1    0.") and "{" not in out
    assert lines[-1] == "no checkpoint was written: add --save_models to write fresh/parameters_final.pkl"
    out = ok(sc, "run_exp", *TINY, "--standard_epochs", "1", "--linear_epochs", "0", "--constant_save",
             "--save_path", "fresh2")
    assert out.strip().splitlines()[-1] == ("fresh2/parameters_final.pkl was not written (add --save_models to write "
                                            "it); the constant saves are in fresh2")


# --------------------------------------------------------------------------------------
# calculate_kernel.py: the reference's name, never another checkpoint's kernel replaced
# --------------------------------------------------------------------------------------
def test_kernel_of_another_checkpoint_is_not_replaced(sc):
    k = ["--dataset_size", "20", "--class_index", "0", "--no_progress"]
    ok(sc, "calculate_kernel", "--model_path", "run/parameters_checkpoint_0.5.pkl", *k)
    path = os.path.join(sc.dir, "run", "saved_kernel_class_0_20.pkl")   # the reference's name
    first = utils.restricted_load(path)
    line = refused(sc, "calculate_kernel", "--model_path", "run/parameters_checkpoint_1.pkl", *k)
    assert line == (f"error: {path} already holds a kernel with --model_path "
                    f"'{os.path.join(sc.dir, 'run', 'parameters_checkpoint_0.5.pkl')}', not "
                    f"'{os.path.join(sc.dir, 'run', 'parameters_checkpoint_1.pkl')}': it is not replaced; to keep both, "
                    f"name this one with --save_name (e.g. --save_name saved_kernel_checkpoint_1) or --bonus_dir")
    # the way out works, and a rerun with the same inputs replaces its own file
    ok(sc, "calculate_kernel", "--model_path", "run/parameters_checkpoint_1.pkl", *k, "--save_name",
       "saved_kernel_checkpoint_1")
    ok(sc, "calculate_kernel", "--model_path", "run/parameters_checkpoint_0.5.pkl", *k, "--memory_gb", "1")
    assert np.allclose(utils.restricted_load(path)["kernel"], first["kernel"], rtol=1e-5)
    assert refused(sc, "calculate_kernel", "--model_path", "run/parameters_checkpoint_0.5.pkl", *k,
                   "--random_seed", "1").startswith(f"error: {path} already holds a kernel with --random_seed 0, not 1")


# --------------------------------------------------------------------------------------
# eval_and_make_adv.py, visualize_ntk_features.py, analyze_ntk.py: same inputs may replace
# --------------------------------------------------------------------------------------
def test_eval_outputs_of_other_inputs_are_not_replaced(sc):
    e = ["--model_path", FINAL, "--test_size", "20", "--pgd_steps", "1", "--no_progress", "--bonus_dir", "ev"]
    ok(sc, "eval_and_make_adv", *e, "--save_examples")
    ok(sc, "eval_and_make_adv", *e)                               # the same evaluation: replaced
    line = refused(sc, "eval_and_make_adv", *e, "--eps", "8")
    assert line == (f"error: {os.path.join(sc.dir, 'run', 'ev', 'test_results_test_results.pkl')} already holds an "
                    f"evaluation with --eps 4.0, not 8.0: it is not replaced; give another --save_name or "
                    f"--bonus_dir, or delete those files")
    ok(sc, "eval_and_make_adv", *e, "--eps", "8", "--save_name", "eps8")
    line = refused(sc, "eval_and_make_adv", "--model_path", "run/parameters_checkpoint_1.pkl", "--test_size", "20",
                   "--no_adv", "--bonus_dir", "ev", "--no_progress")
    assert "already holds an evaluation with --model_path" in line


def test_visualize_outputs_of_other_inputs_are_not_replaced(sc):
    v = ["--model_path", FINAL, "--kernel_path", KERNEL, "--n_images", "1", "--no_progress", "--save_name", "fixture_images",
         "--bonus_dir", "vis"]
    line = refused(sc, "visualize_ntk_features", *v, "--steps", "3")
    assert line.endswith("fixture_images_class_0_20.pkl already holds eigen-images with --steps 2, not 3: it is not "
                         "replaced; give another --save_name or --bonus_dir, or delete those files")
    ok(sc, "visualize_ntk_features", *v, "--steps", "2")


def test_analysis_outputs_of_other_inputs_are_not_replaced(sc):
    f = ["features", "--model_path", FINAL, "--n_train", "10", "--n_test", "10", "--steps", "1", "--n_features", "2",
         "--n_tail", "1", "--out_dir", "an", "--no_progress"]
    ok(sc, "analyze_ntk", *f)
    ok(sc, "analyze_ntk", *f, "--memory_gb", "1")
    line = refused(sc, "analyze_ntk", *f, "--eps", "8")
    assert line == ("error: an/eigen_features.json already holds an eigen-feature analysis with --eps 4.0, not 8.0: "
                    "it is not replaced; give another --out_dir, or delete those files")
    a = ["attack", "--model_path", FINAL, "--n_train", "10", "--n_test", "10", "--steps", "1", "--out_dir", "an",
         "--no_progress", "--no_transfer"]
    ok(sc, "analyze_ntk", *a)
    assert refused(sc, "analyze_ntk", *a, "--method", "fgsm").startswith(
        "error: an/ntk_attack_ntk.json already holds a kernel-predictor attack with --method 'pgd', not 'fgsm'")
    d = ["dynamics", "--runs", "mini", "--dataset_size", "10", "--out_dir", "an", "--no_progress"]
    ok(sc, "analyze_ntk", *d)
    assert refused(sc, "analyze_ntk", *d, "--k", "3").startswith(
        "error: an/dynamics.json already holds a kernel-dynamics analysis with --k 10, not 3")


# --------------------------------------------------------------------------------------
# argparse: one line too
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,argv,message", [
    ("eval_and_make_adv", ["--model_path", FINAL, "--eps", "x"],
     "error: argument --eps: invalid float value: 'x' (eval_and_make_adv.py --help lists the flags)"),
    ("calculate_kernel", ["--model_path", FINAL, "--random_seed", "-1"],
     "error: argument --random_seed: -1 is not a seed: use an integer from 0 to 4294967295 "
     "(calculate_kernel.py --help lists the flags)"),
    ("analyze_ntk", [], "error: the following arguments are required: {dynamics,features,attack} "
                        "(analyze_ntk.py --help lists the flags)"),
    ("run_exp", ["--bogus"], "error: unrecognized arguments: --bogus (run_exp.py --help lists the flags)"),
], ids=["wrong-type", "negative-seed", "no-subcommand", "unknown-flag"])
def test_argparse_errors_are_one_line(sc, monkeypatch, script, argv, message):
    monkeypatch.setattr("sys.argv", [f"{script}.py"])
    assert refused(sc, script, *argv) == message
