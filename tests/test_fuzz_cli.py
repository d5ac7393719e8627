"""A fuzzed command line: for each of the five scripts, hypothesis draws argument lists from the
script's own argparse definition (real flags with values of the wrong type, out-of-range and
negative numbers, NaN and infinities, empty strings, nonexistent paths, directories, and files of
the wrong kind: a kernel file, a results pickle, a PNG, a truncated pickle, an empty file, random
bytes, a symlink loop, a hostile pickle, adversarial examples, a JSON file) and asserts what
docs/bad_input.md promises:

- exit status 0 or 2, never a traceback;
- on exit 2, exactly one line on stderr (`error: ...`);
- no file that was in the scratch directory before the call changed (outputs may be added).

Each call runs the script's `main(argv)` in this process (seconds instead of a JAX import per
call) and is judged as the command line would be: SystemExit gives the exit status as Python
would (None is 0, a message is printed and gives 1), any other exception is a traceback (exit 1),
stdout and stderr are captured at the file-descriptor level too (so C-level output counts), and
warnings are filtered as in a fresh interpreter. `test_in_process_judgement_equals_the_cli`
checks that judgement against real subprocesses.

The scratch directory holds a tiny digits MLP run (1 epoch on 40 images, constant saves), its
kernel, evaluation and eigen-image outputs and the broken files; it is restored before every
example. Sizes that cost time (epochs, attack steps, images) are drawn from small values only,
so a call that succeeds takes a second or two; the network is blocked (CIFAR fails as offline).

Seeded (derandomized) and small for CI: NTK_FUZZ_EXAMPLES examples per script (default 10);
NTK_FUZZ_EXAMPLES=200 NTK_FUZZ_SEED=1 python -m pytest -q tests/test_fuzz_cli.py for a longer
run with another seed.
"""
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings, seed
from hypothesis import strategies as st

from cli_harness import FIXTURE_SEED, Scratch, call, offline, verdict
from conftest import ROOT

pytestmark = pytest.mark.slow   # fuzzing: `pytest -m "not slow"` skips it

EXAMPLES = int(os.environ.get("NTK_FUZZ_EXAMPLES", "10"))
SEED = os.environ.get("NTK_FUZZ_SEED")
SCRIPTS = ("run_exp", "eval_and_make_adv", "calculate_kernel", "visualize_ntk_features", "analyze_ntk")


# ------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------
FILES = ["run/parameters_final.pkl", "run/parameters_checkpoint_0.pkl", "run/parameters_checkpoint_1.pkl",
         "run/kernels/fixture_class_0_20.pkl", "run/results.pkl", "run/results.json", "run/config.json",
         "run/evals/adv_examples_fixture.pkl", "run/evals/test_results_fixture.pkl",
         "run/vis/fixture_images_class_0_20.png", "run/vis/fixture_images_class_0_20.pkl",
         "truncated.pkl", "empty.pkl", "notes.txt", "evil.pkl", "random.bin", "loop", "loop/inside.pkl"]
MISSING = ["nope.pkl", "nodir/nope.pkl", "run/parameters_checkpoint_9.pkl"]
DIRS = [".", "run", "mini", "run/kernels", "emptydir"]
PATHS = FILES + MISSING + DIRS + ["", " ", "notes.txt/inside.pkl"]
OUT_DIRS = [".", "out", "out/deeper", "run", "mini", "emptydir", "run/kernels", "notes.txt", "notes.txt/sub", "",
            "new dir", "../outside_not", "nodir/a/b"]
NAMES = ["x", "test_results", "saved_kernel", "ntk", "a b", "", "sub/name", "../up", "ünï"]
INTS = ["0", "1", "2", "3", "-1", "-7", "10", "20", "25", "64", "99999", "12345678901234567890", "x", "", "1.5",
        "1e3", " 3", "nan"]
# Flags whose value is what a run costs: drawn from small values (and invalid ones) only.
SMALL_INTS = ["0", "1", "2", "-1", "-3", "x", "", "2.5", "1e1"]
FLOATS = ["0", "1", "4", "32", "0.5", "-1", "-0", "nan", "inf", "-inf", "1e38", "1e-30", "1e-300", "x", "",
          "1e999", "0x10"]
assert FIXTURE_SEED not in INTS + SMALL_INTS  # so no drawn run is the fixture's run (which may be replaced)
JUNK = ["--bogus", "stray", "--", "-x", "--mod", "--no", "--help", "-h", "--model_path=", "--eps=1=2", "@args"]
COST = {"model", "standard_epochs", "linear_epochs", "pgd_eval_steps", "pgd_steps", "steps", "restarts", "width",
        "n_images", "n_features", "n_tail", "n_target_classes"}
PATH_FLAGS = {"model_path", "base_model_path", "kernel_path", "test_path", "kernel_files", "data_dir"}
DIR_FLAGS = {"save_path", "bonus_dir", "out_dir", "runs"}
NAME_FLAGS = {"save_name", "labels"}
# Models drawn for run_exp.py: ResNet-18 costs minutes to compile on 2 cores, so it is left out.
MODELS = ["mlp_skinny", "mlp_wide", "linear", "bogus", ""]

# What every call of a script starts from: sizes that make a successful call quick (the drawn
# flags come after, and argparse keeps the last value), required paths that exist.
BASE = {
    "run_exp": {"save_path": "out/run", "standard_epochs": "1", "linear_epochs": "1", "dataset": "digits",
                "model": "mlp_skinny", "train_size": "40", "test_size": "20", "batch_size": "20",
                "pgd_eval_steps": "1"},
    "eval_and_make_adv": {"model_path": "run/parameters_final.pkl", "test_size": "20", "pgd_steps": "1",
                          "restarts": "1", "n_target_classes": "2"},
    "calculate_kernel": {"model_path": "run/parameters_final.pkl", "dataset_size": "20"},
    "visualize_ntk_features": {"model_path": "run/parameters_final.pkl", "steps": "2", "n_images": "1",
                               "kernel_path": "run/kernels/fixture_class_0_20.pkl"},
    "dynamics": {"runs": ["mini"], "dataset_size": "10", "out_dir": "out/an"},
    "features": {"model_path": "run/parameters_final.pkl", "n_train": "10", "n_test": "10", "steps": "1",
                 "n_features": "2", "n_tail": "1"},
    "attack": {"model_path": "run/parameters_final.pkl", "n_train": "10", "n_test": "10", "steps": "1"},
}


def _pool(action):
    import argparse
    name = action.dest
    if name == "model":
        return MODELS
    if action.choices:
        return list(action.choices) + ["bogus", ""]
    if name in PATH_FLAGS:
        return PATHS
    if name in DIR_FLAGS:
        return OUT_DIRS
    if name in NAME_FLAGS:
        return NAMES
    if name in COST:
        return SMALL_INTS
    if action.type is int or name == "random_seed":
        return INTS
    if action.type is not None:                  # float, cli.positive_float
        return FLOATS
    assert isinstance(action, argparse._StoreAction), action  # a new kind of flag needs a pool
    return NAMES + PATHS


def parser_of(script):
    """(argparse parser, BASE key, argv prefix) of a script or an analyze_ntk subcommand."""
    import importlib
    if script.startswith("analyze_ntk "):
        sub = script.split()[1]
        p = importlib.import_module("analyze_ntk").build_parser()
        subs = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
        return subs.choices[sub], sub, [sub]
    return importlib.import_module(script).build_parser(), script, []


@st.composite
def command_lines(draw, script):
    """An argument list for `script` drawn from its parser: up to three of its flags are drawn
    (a drawn switch is on; a drawn flag with a value gets a drawn value, or is left out, so a
    required flag may go missing), every other flag keeps its base value (or its default);
    sometimes a junk word is inserted."""
    p, key, argv = parser_of(script)
    argv = list(argv)
    base = BASE[key]
    actions = [a for a in p._actions if a.option_strings and "-h" not in a.option_strings]
    chosen = draw(st.lists(st.sampled_from([a.dest for a in actions]), max_size=3, unique=True))
    for action in actions:
        flag, name = action.option_strings[-1], action.dest
        if action.nargs == 0:                        # a switch: --no_progress always (bars are not lines)
            if name == "no_progress" or name in chosen:
                argv.append(flag)
        elif name in chosen and (name in COST or draw(st.integers(0, 3)) > 0):
            pool = _pool(action)
            if action.nargs in ("+", "*"):
                values = draw(st.lists(st.sampled_from(pool), max_size=3))
                argv += [flag, *values]
            else:
                argv += [flag, draw(st.sampled_from(pool))]
        elif name in base and name not in chosen:
            value = base[name]
            argv += [flag, *value] if isinstance(value, list) else [flag, value]
    if draw(st.integers(0, 9)) == 0:
        argv.insert(draw(st.integers(0, len(argv))), draw(st.sampled_from(JUNK)))
    return argv


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    with offline():
        yield Scratch(str(tmp_path_factory.mktemp("fuzz")))


def check(scratch, script, argv):
    scratch.restore()
    code, out, err = call(script, argv, scratch.dir)
    problem = verdict(code, err)
    changed = scratch.changed()
    if changed:
        problem = (problem + "; " if problem else "") + f"changed {changed}"
    if os.path.exists(os.path.join(scratch.dir, "pwned_by_pickle")):
        problem = (problem + "; " if problem else "") + "ran the hostile pickle"
    assert problem is None, f"{script} {argv}: {problem}\nstdout: {out[-1500:]}\nstderr: {err[-3000:]}"
    return code


# ------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------
TARGETS = ["run_exp", "eval_and_make_adv", "calculate_kernel", "visualize_ntk_features",
           "analyze_ntk dynamics", "analyze_ntk features", "analyze_ntk attack"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=True,
                suppress_health_check=list(HealthCheck))


def _seeded(test):
    return seed(int(SEED))(test) if SEED is not None else test


@pytest.mark.parametrize("script", TARGETS)
def test_fuzzed_command_line_exits_0_or_2_with_one_line_and_changes_nothing(scratch, script):
    codes = []

    @FUZZ
    @_seeded
    @given(st.data())
    def fuzz(data):
        argv = data.draw(command_lines(script), label="argv")
        codes.append(check(scratch, script, argv))

    fuzz()
    # not a degenerate fuzz: some drawn command lines run to the end, others are refused
    assert 0 in codes and 2 in codes, codes


def test_in_process_judgement_equals_the_cli(scratch):
    """The in-process judgement of `call` gives the exit status and stderr lines of a real
    `python script.py ...`: an argparse error, a user error after JAX loaded, a success, and a
    crash planted in a copy of a script (the traceback the fuzz must see)."""
    cases = [("eval_and_make_adv", ["--model_path", "run/parameters_final.pkl", "--eps", "x"]),
             ("calculate_kernel", ["--model_path", "run", "--no_progress"]),
             ("calculate_kernel", ["--model_path", "run/parameters_final.pkl", "--dataset_size", "20",
                                   "--class_index", "0", "--bonus_dir", "../elsewhere", "--no_progress"]),
             ("analyze_ntk", ["dynamics", "--runs", "mini", "--dataset_size", "10", "--k", "0"])]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    for script, argv in cases:
        scratch.restore()
        code, _, err = call(script, argv, scratch.dir)
        scratch.restore()
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script + ".py"), *argv],
                              cwd=scratch.dir, env=env, capture_output=True, text=True)
        assert (code, len(err.strip().splitlines())) == (proc.returncode, len(proc.stderr.strip().splitlines())), \
            (script, argv, err, proc.stderr)
        assert verdict(code, err) is None
    # a crash is judged a crash: a main() that raises
    import types
    broken = types.ModuleType("broken")
    broken.main = lambda argv: [][1]
    sys.modules["broken_script"] = broken
    try:
        code, _, err = call("broken_script", [], scratch.dir)
    finally:
        del sys.modules["broken_script"]
    assert code == 1 and verdict(code, err) == "traceback"
    assert verdict(2, "usage: x\nerror: y\n") == "exit 2 with 2 stderr lines"
