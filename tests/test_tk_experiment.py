"""tk_experiment.py end to end on a tiny experiment (digits, fc1 and conv1, both tasks, two widths):
every cell runs, the report states each claim with the numbers of the cells it read, a second run
runs nothing, the --print_commands lines are valid commands of their scripts; bad input is one
line, exit 2, before any run."""
import json
import os
import shlex
import sys

import numpy as np
import pytest

from cli_harness import call
from conftest import ROOT

sys.path.insert(0, ROOT)

TINY = ["--preset", "digits", "--archs", "fc1", "conv1", "--n_train", "20", "--n_test", "10", "--n_features", "3",
        "--n_tail", "1", "--widths", "8", "32", "--train_epochs", "1", "--train_size", "100", "--test_size", "50",
        "--pgd_steps", "2", "--motion_size", "10", "--no_progress"]
N_CELLS = 2 * (2 + 1) + 2 * 2 * 3   # per arch: two widths and their motion; per task and arch: features, FGSM, PGD


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    import tk_experiment
    out = tmp_path_factory.mktemp("tk") / "e"
    first = tk_experiment.run(tk_experiment.build_parser().parse_args([*TINY, "--out_dir", str(out), "--jobs", "2"]))
    return out, first


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it
def test_every_cell_runs_and_a_second_run_runs_nothing(experiment):
    import tk_experiment
    out, first = experiment
    assert len(first["ran"]) == N_CELLS and not first["failed"]
    again = tk_experiment.run(tk_experiment.build_parser().parse_args([*TINY, "--out_dir", str(out)]))
    assert again["ran"] == [] and again["report"] == first["report"]
    with open(out / "finite" / "fc1_w8" / "metrics.jsonl") as f:   # run_exp --lr: the preset's rate, not 0.1
        lrs = [json.loads(line)["lr"] for line in f if '"epoch"' in line]
    assert lrs == [pytest.approx(tk_experiment.PRESETS["digits"]["lr"])]


@pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it
def test_the_report_states_each_claim_with_the_cells_numbers(experiment):
    out, first = experiment
    report = open(first["report"]).read()
    for claim in ("training-free", "top of the spectrum", "consistent across architectures", "transfer to finite",
                  "Wider is lazier"):
        assert claim in report
    assert "Not measured" not in report and "n/a" not in report
    for name in ("features_by_index.png", "consistency.png", "feature_images_binary.png", "feature_images_all.png",
                 "commands.sh"):
        assert os.path.getsize(out / "report" / name) > 0
    results = _json(out / "report" / "results.json")
    for task in ("binary", "all"):
        for arch in ("fc1", "conv1"):
            attack = _json(out / "kernel" / task / arch / "attack_pgd" / "ntk_attack_ntk.json")
            assert results["predictor"][task][arch]["pgd"] == attack["kernel_predictor"]
            assert f"{arch} {task}: clean {attack['kernel_predictor']['acc_clean']:.3f}" in report
            assert [t["width"] for t in attack["network_transfer"]] == [8, 32]
            assert attack["random_start"] is False


@pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it
def test_consistency_is_the_cosine_of_the_features_values(experiment):
    """The measure of claim 3, recomputed from the two features cells' values."""
    out, _ = experiment
    results = _json(out / "report" / "results.json")
    for task in ("binary", "all"):
        (pair,) = results["consistency"][task]
        a, b = (np.asarray(_json(out / "kernel" / task / arch / "features" / "eigen_features.json")
                           ["feature_values"]["values"]) for arch in pair["pair"])
        for j, cos in enumerate(pair["cos_same_index"]):
            u, v = a[j].ravel(), b[j].ravel()
            assert cos == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), rel=1e-6)


@pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it
def test_kernel_change_is_the_distance_of_the_first_and_last_kernels(experiment):
    out, _ = experiment
    results = _json(out / "report" / "results.json")
    dyn = _json(out / "motion" / "fc1" / "dynamics.json")
    for w in (8, 32):
        run = dyn["runs"][f"w{w}"]
        a, b = run["frobenius_norm"][-1], run["frobenius_norm"][0]
        cos = 1 - run["distance_to_init"][-1]
        assert results["kernel_motion"]["fc1"][str(w)] == pytest.approx(np.sqrt(a * a + b * b - 2 * a * b * cos) / b)


@pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it
def test_printed_commands_are_valid_command_lines(experiment, capsys):
    import importlib

    import tk_experiment
    out, _ = experiment
    tk_experiment.run(tk_experiment.build_parser().parse_args([*TINY, "--out_dir", str(out), "--print_commands"]))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == N_CELLS + 1 and lines[-1].endswith("--report_only")
    cells = {c.name: c for c in tk_experiment.make_cells(tk_experiment.resolve(
        tk_experiment.build_parser().parse_args([*TINY, "--out_dir", str(out)])))}
    for line in lines[:-1]:
        name = shlex.split(line)[-1]
        cell = cells[name]
        importlib.import_module(cell.script).build_parser().parse_args(cell.argv)   # a valid command of its script


@pytest.mark.parametrize("argv, message", [
    (["--classes", "0", "1", "2"], "--classes: the binary task takes two distinct classes in [0, 9] (got 0 1 2)"),
    (["--classes", "4", "4"], "--classes: the binary task takes two distinct classes"),
    (["--archs", "resnet18"], "--archs resnet18: write an architecture as fc{depth}"),
    (["--archs", "myrtle6"], "--archs myrtle6: Myrtle networks have depth 5, 7, 10"),
    (["--n_test", "15"], "--n_test 15 is not divisible by the 2 classes of the binary task"),
    (["--widths", "64"], "--widths: give at least two distinct positive widths"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--preset", "cifar-subset", "--data_dir", "nowhere"], "--data_dir nowhere holds no cifar10"),
])
def test_bad_input_is_one_line_before_any_run(tmp_path, argv, message):
    code, _, err = call("tk_experiment", [*argv, "--out_dir", "out"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
