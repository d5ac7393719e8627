"""tk_training.py end to end on a tiny experiment (digits, cnn_mega width 4, 2 epochs, full kernels
of 10 images): the three runs and their full-kernel dynamics complete, the report's numbers are
dynamics.json's, a second run runs nothing; the paper-scale presets print their commands without
the data; bad input is one line, exit 2, before any run."""
import json
import shlex

import pytest

from cli_harness import call

TINY = ["--preset", "digits", "--width", "4", "--epochs", "2", "--kernel_size", "10", "--k", "5", "--pgd_steps", "3",
        "--pgd_eval_steps", "2", "--train_size", "200", "--test_size", "100", "--no_progress"]


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it
def test_the_experiment_runs_resumes_and_reports_the_dynamics_numbers(tmp_path):
    import tk_training
    out = tmp_path / "e"
    argv = [*TINY, "--out_dir", str(out)]
    first = tk_training.run(tk_training.build_parser().parse_args(argv))
    assert sorted(first["ran"]) == ["dynamics", "train/clean", "train/fgsm", "train/pgd"] and not first["failed"]
    dyn = _json(out / "dynamics" / "dynamics.json")
    assert dyn["full"] and dyn["bottom"] == "rest" and set(dyn["runs"]) == {"clean", "FGSM", "PGD-3"}
    pgd = dyn["runs"]["PGD-3"]
    assert pgd["eigenspaces"]["size"] == 100 and pgd["eigenspaces"]["bottom_count"] == 95   # 10 classes x 10 images
    assert pgd["epochs"][0] == 0 and pgd["epochs"][-1] == 2
    # The runs trained as named: their checkpoints' meta say how.
    meta = _json(out / "train" / "pgd" / "config.json")["args"]
    assert (meta["train_steps"], meta["adv_only"], meta["momentum"], meta["lr_schedule"]) == (3, True, 0.0, "constant")
    results = _json(out / "report" / "results.json")
    s = results["summary"]["pgd"]
    assert s["final_distance_to_init"] == pgd["distance_to_init"][-1]
    assert s["mass_top10"] == pgd["mass"]["top10"][-1]
    assert [c["claim"][:20] for c in results["claims"]] == ["Under adversarial tr", "... and moves less l",
                                                           "Adversarial training"]
    report = open(first["report"]).read()
    assert "n/a" not in report and "polar_dynamics.png" in report
    assert f"{s['final_distance_to_init']:.3f}" in report
    again = tk_training.run(tk_training.build_parser().parse_args(argv))
    assert again["ran"] == []


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
def test_the_paper_scale_presets_print_their_commands_without_the_data(preset, tmp_path, capsys):
    import importlib

    import tk_training
    args = tk_training.build_parser().parse_args(["--preset", preset, "--data_dir", str(tmp_path / "none"),
                                                  "--out_dir", str(tmp_path / "o"), "--print_commands"])
    tk_training.run(args)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 5 and lines[-1].endswith("--report_only")
    cells = {c.name: c for c in tk_training.make_cells(tk_training.resolve(args))}
    for line in lines[:-1]:
        cell = cells[shlex.split(line)[-1]]
        parsed = importlib.import_module(cell.script).build_parser().parse_args(cell.argv)   # a valid command
        if cell.script == "run_exp":
            assert (parsed.dataset, parsed.model, parsed.lr, parsed.batch_size, parsed.standard_epochs) == \
                (preset, "cnn_mega", 0.01, 250, 200)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--kernel_size", "10", "--k", "100"], "--k 100 leaves no bottom space in a full kernel of 100 rows"),
    (["--kernel_size", "15"], "--kernel_size 15 is not divisible by the number of classes (10)"),
    (["--lr", "0"], "--lr must be finite and > 0"),
    (["--preset", "mnist", "--data_dir", "nowhere"], "--data_dir nowhere holds no mnist"),
])
def test_bad_input_is_one_line_before_any_run(tmp_path, argv, message):
    code, _, err = call("tk_training", [*argv, "--out_dir", "out"], str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
