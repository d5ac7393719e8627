"""Print docs/bad_input.md's table by running every bad input through the real scripts.

    python docs/bad_inputs.py > /tmp/bad_inputs.md      # a few minutes on 2 CPU cores

It makes a scratch directory holding two tiny digits runs, a kernel file and some broken files,
runs each command there (so the messages show short relative paths; an absolute path into it is
shown as <scratch>), and checks what docs/bad_input.md
promises: exit status 2, exactly one line on stderr starting with "error: ", no traceback, and no
file in the scratch directory changed, added or removed, and no folder created. It fails loudly if any row breaks that promise. The last
column names the test that asserts the same message in CI (this script is not a test: it takes
minutes, and the tests already cover every row).
"""
import hashlib
import os
import pickle
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = [sys.executable]
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
TINY = "--dataset digits --model mlp_skinny --train_size 100 --test_size 50 --pgd_eval_steps 2 --no_progress"
FEATURES = ("features --model_path run/parameters_final.pkl --n_train 10 --n_test 10 --steps 1 --n_features 2 "
            "--n_tail 1 --out_dir an --no_progress")

# (input, command run in the scratch directory, the test asserting the same message)
ROWS = [
    ("missing checkpoint", "eval_and_make_adv.py --model_path run/nope.pkl",
     "test_checkpoints.py::test_corrupt_and_missing_checkpoints"),
    ("truncated checkpoint", "eval_and_make_adv.py --model_path truncated.pkl",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[base-truncated]"),
    ("a file that is not a pickle", "calculate_kernel.py --model_path README.txt",
     "test_checkpoints.py::test_corrupt_and_missing_checkpoints"),
    ("hostile pickle (runs `os.system` when unpickled)", "run_exp.py --base_model_path evil.pkl",
     "test_checkpoints.py::test_hostile_pickle_is_refused_and_runs_nothing"),
    ("checkpoint of another model", f"run_exp.py {TINY.replace('mlp_skinny', 'mlp_wide')} "
     "--base_model_path run/parameters_final.pkl",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[base-other-model]"),
    ("checkpoint of another width", "calculate_kernel.py --model_path resnet/parameters_final.pkl --width 8",
     "test_ntk.py::test_bad_inputs_are_refused_before_any_work"),
    ("checkpoint of another class count", f"run_exp.py {TINY} --base_model_path classes100.pkl",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[base-other-classes]"),
    ("same, without the `meta` record (a reference checkpoint)",
     f"run_exp.py {TINY} --base_model_path classes100_nometa.pkl",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[base-other-classes-no-meta]"),
    ("bad `--loaders`", f"run_exp.py {TINY} --loaders CX",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[loaders-CX]"),
    ("negative `--eps`", f"run_exp.py {TINY} --eps -1",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[negative-eps]"),
    ("negative `--eps` (evaluation)", "eval_and_make_adv.py --model_path run/parameters_final.pkl --eps -1",
     "test_eval.py::test_bad_inputs_are_clear_errors"),
    ("out-of-range `--class_index`", "calculate_kernel.py --model_path run/parameters_final.pkl --class_index 10",
     "test_ntk.py::test_bad_inputs_are_refused_before_any_work"),
    ("`--dataset_size` not divisible by the class count",
     "calculate_kernel.py --model_path run/parameters_final.pkl --dataset_size 25",
     "test_ntk.py::test_bad_inputs_are_refused_before_any_work"),
    ("`--dataset_size` too large", "calculate_kernel.py --model_path run/parameters_final.pkl --dataset_size 5000",
     "test_ntk.py::test_bad_inputs_are_refused_before_any_work"),
    ("kernel file from another run", "visualize_ntk_features.py --model_path other/parameters_final.pkl "
     "--kernel_path run/saved_kernel_class_0_20.pkl",
     "test_visualize.py::test_kernel_of_another_model_or_checkpoint_is_refused"),
    ("kernel file for another class", "visualize_ntk_features.py --model_path run/parameters_final.pkl "
     "--kernel_path run/saved_kernel_class_0_20.pkl --class_index 3",
     "test_visualize.py::test_cli_prints_one_line_error"),
    ("`--test_path` without `labels`", "eval_and_make_adv.py --model_path run/parameters_final.pkl "
     "--test_path no_labels.pkl", "test_eval.py::test_bad_inputs_are_clear_errors"),
    ("`--test_path` images N×H×W×C", "eval_and_make_adv.py --model_path run/parameters_final.pkl "
     "--test_path nhwc.pkl", "test_eval.py::test_bad_inputs_are_clear_errors"),
    ("`--test_path` images of another size", "eval_and_make_adv.py --model_path run/parameters_final.pkl "
     "--test_path cifar_shaped.pkl", "test_eval.py::test_bad_inputs_are_clear_errors"),
    ("`--test_path` pixels in 0..255", "eval_and_make_adv.py --model_path run/parameters_final.pkl "
     "--test_path uint8.pkl", "test_eval.py::test_bad_inputs_are_clear_errors"),
    ("unwritable `--save_path` (a file is in the way)", f"run_exp.py {TINY} --save_path blocker/run",
     "test_run_exp.py::test_unwritable_save_path_is_one_line"),
    ("`--resume` with nothing to resume", f"run_exp.py {TINY} --resume --save_path empty",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[resume-nothing]"),
    ("`--resume` with other flags than the run's",
     f"run_exp.py {TINY} --standard_epochs 1 --linear_epochs 0 --save_models --save_path run --resume --eps 8",
     "test_run_exp.py::test_bad_input_is_one_line_and_changes_nothing[resume-other-flags]"),
    ("CIFAR-10 missing, no network", "run_exp.py --dataset cifar10 --data_dir nodata --no_progress",
     "test_download.py::test_no_server_is_a_one_line_error_saying_where_to_put_the_files"),
    ("a run directory as `--model_path`", "eval_and_make_adv.py --model_path run",
     "test_no_lost_work.py::test_a_directory_for_a_file_is_named_as_one[eval-model_path]"),
    ("a run directory as `--model_path` (kernel)", "calculate_kernel.py --model_path run --dataset_size 20",
     "test_no_lost_work.py::test_a_directory_for_a_file_is_named_as_one[kernel-model_path]"),
    ("a run directory as `--model_path` (analysis)", "analyze_ntk.py features --model_path run",
     "test_no_lost_work.py::test_a_directory_for_a_file_is_named_as_one[features-model_path]"),
    ("a run directory as `--base_model_path`", f"run_exp.py {TINY} --base_model_path run",
     "test_no_lost_work.py::test_a_directory_for_a_file_is_named_as_one[run_exp-base_model_path]"),
    ("a directory as `--kernel_path`", "visualize_ntk_features.py --model_path run/parameters_final.pkl "
     "--kernel_path run", "test_no_lost_work.py::test_a_directory_for_a_file_is_named_as_one[visualize-kernel_path]"),
    ("a directory as `--test_path`", "eval_and_make_adv.py --model_path run/parameters_final.pkl --test_path run",
     "test_no_lost_work.py::test_a_directory_for_a_file_is_named_as_one[eval-test_path]"),
    ("a failing analysis with a new `--out_dir` (no empty folder is left)",
     "analyze_ntk.py features --model_path run/parameters_final.pkl --n_train 3 --out_dir new_out",
     "test_no_lost_work.py::test_a_failing_run_leaves_no_empty_folder[features-out_dir-bad-n_train]"),
    ("`--save_path` holding another run", f"run_exp.py {TINY} --standard_epochs 1 --linear_epochs 0 --eps 8 "
     "--save_path run", "test_no_lost_work.py::test_run_exp_refuses_a_save_path_holding_another_run"),
    ("`--resume` with `--overwrite`", f"run_exp.py {TINY} --save_path run --resume --overwrite",
     "test_no_lost_work.py::test_run_exp_refuses_files_without_a_record_and_contradicting_flags"),
    ("the kernel of another checkpoint under the same name",
     "calculate_kernel.py --model_path run/parameters_checkpoint_1.pkl --dataset_size 20 --class_index 0",
     "test_no_lost_work.py::test_kernel_of_another_checkpoint_is_not_replaced"),
    ("an evaluation with other flags under the same name",
     "eval_and_make_adv.py --model_path run/parameters_final.pkl --test_size 20 --pgd_steps 1 --eps 8",
     "test_no_lost_work.py::test_eval_outputs_of_other_inputs_are_not_replaced"),
    ("an analysis with other flags in the same `--out_dir`", f"analyze_ntk.py {FEATURES} --eps 8",
     "test_no_lost_work.py::test_analysis_outputs_of_other_inputs_are_not_replaced"),
    ("a value of the wrong type", "eval_and_make_adv.py --model_path run/parameters_final.pkl --eps x",
     "test_no_lost_work.py::test_argparse_errors_are_one_line[wrong-type]"),
    ("`--eps` far beyond 255 (it is in 1/255 units)", f"run_exp.py {TINY} --eps 1e9",
     "test_cluster_runs.py::test_absurd_eps_is_refused_and_ignored_flags_are_named"),
    ("a PNG as `--model_path`", "eval_and_make_adv.py --model_path figure.png",
     "test_cluster_runs.py::test_a_png_given_as_a_pickle_is_one_line"),
    ("a PNG as `--kernel_path`", "visualize_ntk_features.py --model_path run/parameters_final.pkl "
     "--kernel_path figure.png", "test_cluster_runs.py::test_a_png_given_as_a_pickle_is_one_line"),
    ("`--save_path` in use by a run still going (here: this script holds its lock)",
     f"run_exp.py {TINY} --save_path busy",
     "test_cluster_runs.py::test_two_runs_started_together_into_one_save_path"),
    ("`--arch` with `--model_path` (two kernel sources)",
     "analyze_ntk.py features --arch fc --depth 1 --model_path run/parameters_final.pkl",
     "test_tk_features.py::test_bad_architecture_flags_are_one_line"),
    ("`--transfer_to` a checkpoint of another input shape",
     "analyze_ntk.py attack --arch fc --depth 1 --dataset cifar10 --transfer_to run/parameters_final.pkl",
     "test_analysis.py::test_an_infinite_kernels_examples_transfer_to_networks"),
    ("`--model fc` without `--depth`", f"run_exp.py {TINY.replace('mlp_skinny', 'fc')}",
     "test_tk_networks.py::test_architecture_flags_are_checked_in_one_line"),
    ("`--classes` that are not two classes, for a binary task", "tk_experiment.py --classes 0 1 2 --out_dir tk",
     "test_tk_experiment.py::test_bad_input_is_one_line_before_any_run"),
    ("an unknown architecture in `--archs`", "tk_experiment.py --archs resnet18 --out_dir tk",
     "test_tk_experiment.py::test_bad_input_is_one_line_before_any_run"),
    ("a negative `--random_seed`", "calculate_kernel.py --model_path run/parameters_final.pkl --random_seed -1",
     "test_no_lost_work.py::test_argparse_errors_are_one_line[negative-seed]"),
    ("`--full` with one class", "calculate_kernel.py --model_path run/parameters_final.pkl --full --class_index 0",
     "test_full_ntk.py::test_calculate_kernel_full_bad_inputs_are_one_line"),
    ("MNIST not in `--data_dir` and no network", f"run_exp.py {TINY.replace('digits', 'mnist')} --data_dir offline",
     "test_mnist_download.py::test_no_server_is_a_one_line_error_with_the_hint_and_leaves_no_data_dir"),
    ("FGSM training with PGD's flags", f"run_exp.py {TINY} --loaders AC --train_attack fgsm --train_steps 5",
     "test_tk_training.py::test_bad_recipe_flags_are_one_line_errors"),
    ("a top-k space that leaves no bottom space", "tk_training.py --kernel_size 10 --k 100 --out_dir tk",
     "test_tk_training_experiment.py::test_bad_input_is_one_line_before_any_run"),
]


def sh(cmd, cwd):
    return subprocess.run(PY + [os.path.join(ROOT, cmd.split()[0])] + shlex.split(cmd)[1:], cwd=cwd,
                          env=ENV, capture_output=True, text=True)


def setup(d):
    for cmd in (f"run_exp.py {TINY} --standard_epochs 1 --linear_epochs 0 --save_models --constant_save --save_path run",
                f"run_exp.py {TINY} --standard_epochs 1 --linear_epochs 0 --save_models --save_path other "
                "--random_seed 1",
                f"run_exp.py {TINY.replace('mlp_skinny', 'resnet18 --width 2')} --standard_epochs 0 "
                "--linear_epochs 0 --save_models --save_path resnet",
                "calculate_kernel.py --model_path run/parameters_final.pkl --dataset_size 20 --class_index 0",
                "eval_and_make_adv.py --model_path run/parameters_final.pkl --test_size 20 --pgd_steps 1 --no_progress",
                f"analyze_ntk.py {FEATURES}"):
        p = sh(cmd, d)
        assert p.returncode == 0, (cmd, p.stderr[-2000:])
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import models
    import checkpoints
    meta = checkpoints.load_checkpoint(os.path.join(d, "run", "parameters_final.pkl"))["meta"]
    init, _ = models.get_model("mlp_skinny", 100)
    p, s = init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    meta100 = {**{k: v for k, v in meta.items() if k != "dataset"}, "num_classes": 100}
    checkpoints.save_checkpoint(os.path.join(d, "classes100.pkl"), p, p, s, meta100)
    checkpoints.save_checkpoint(os.path.join(d, "classes100_nometa.pkl"), p, p, s)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned_by_pickle",))

    files = {"evil.pkl": {"params": Evil(), "lin_params": {}, "net_state": {}}}
    x = np.full((4, 1, 8, 8), 0.5, np.float32)
    y = np.arange(4)
    files.update({"no_labels.pkl": {"images": x}, "nhwc.pkl": {"images": x.transpose(0, 2, 3, 1), "labels": y},
                  "cifar_shaped.pkl": {"images": np.zeros((4, 3, 32, 32), np.float32), "labels": y},
                  "uint8.pkl": {"images": (x * 255).astype(np.uint8), "labels": y}})
    for name, obj in files.items():
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(obj, f)
    with open(os.path.join(d, "run", "parameters_final.pkl"), "rb") as f:
        raw = f.read()
    with open(os.path.join(d, "truncated.pkl"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    for name, text in {"README.txt": "not a checkpoint\n", "blocker": "a file, not a directory\n"}.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
    with open(os.path.join(d, "figure.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(64))
    import utils
    utils.lock_dir(os.path.join(d, "busy"))   # held by this process until it ends


def snapshot(d):
    """Every file (mtime, sha1) and every folder under `d`."""
    out = {}
    for root, _, names in os.walk(d):
        out[root] = "folder"
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mtime_ns, hashlib.sha1(f.read()).hexdigest())
    return out


def main():
    with tempfile.TemporaryDirectory() as d:
        setup(d)
        print("| bad input | command | exit | message (stderr, one line) | test |\n|---|---|---|---|---|")
        for what, cmd, test in ROWS:
            before = snapshot(d)
            p = sh(cmd, d)
            lines = p.stderr.strip().splitlines()
            ok = (p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
                  and "Traceback" not in p.stderr and snapshot(d) == before
                  and not os.path.exists(os.path.join(d, "pwned_by_pickle")))
            if not ok:
                sys.exit(f"row {what!r} broke the promise: exit {p.returncode}, stderr:\n{p.stderr[-3000:]}")
            # calculate_kernel.py records absolute paths: show the scratch directory as <scratch>
            message = lines[0].replace(os.path.realpath(d), "<scratch>").replace(d, "<scratch>").replace("|", "\\|")
            print(f"| {what} | `{cmd}` | {p.returncode} | `{message}` | `{test}` |", flush=True)


if __name__ == "__main__":
    main()
