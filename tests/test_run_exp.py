"""run_exp.py end to end on digits with tiny models: the files each loader and each phase-2
dynamics writes, base checkpoints, an honest learning test, --resume (interrupted in process and
killed -9), crash-safe saves, the NaN guard and bad input."""
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import run_exp
import checkpoints
import experiment
import train as training
import utils
from utils import UserError

pytestmark = pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
# 200 train images in 4 batches of 50, 100 test images, 2-step evaluation attacks.
TINY = ["--dataset", "digits", "--train_size", "200", "--test_size", "100", "--batch_size", "50",
        "--pgd_eval_steps", "2", "--no_progress"]
MLP = ["--model", "mlp_skinny"]
SAVES = ["--constant_save", "--constant_save_linear", "--save_models"]
FRACTIONS_IN_2_EPOCHS = ("0.125", "0.25", "0.375", "0.5", "0.75", "1.5")


def train(save_path, *argv, base=TINY):
    """run_exp.run in this process (faster than a subprocess); returns the results dict."""
    return run_exp.run(run_exp.build_parser().parse_args([*base, "--save_path", str(save_path), *argv]))


def cli(*argv, cwd=ROOT, prelude=""):
    """run_exp.py as a user runs it; `prelude` is Python run first in the same process."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['run_exp.py'] + {list(map(str, argv))!r}\n" \
           f"runpy.run_path({os.path.join(ROOT, 'run_exp.py')!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True)


def ckpt(path):
    return checkpoints.load_checkpoint(str(path))


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def same(a, b):
    la, lb = leaves(a), leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(la, lb))


def finite(tree):
    return all(np.isfinite(x).all() for x in leaves(tree) if x.dtype.kind == "f")


def metrics(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def epochs(d, phase):
    return [m for m in metrics(d) if m["event"] == "epoch" and m["phase"] == phase]


def results(d):
    with open(os.path.join(d, "results.json")) as f:
        res = json.load(f)
    assert utils.restricted_load(os.path.join(d, "results.pkl")) == res
    return res


def snapshot(*dirs):
    """{path: (size, mtime, sha1)} of every file under `dirs`."""
    out = {}
    for d in dirs:
        for root, _, files in os.walk(d):
            for name in files:
                p = os.path.join(root, name)
                st = os.stat(p)
                with open(p, "rb") as f:
                    out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha1(f.read()).hexdigest())
    return out


def one_line_error(proc):
    """The CLI failed with exit 2 and printed exactly one line, no traceback. Returns it."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------------------
# Runs shared by several tests
# --------------------------------------------------------------------------------------
PHASE12 = [*MLP, "--standard_epochs", "2", "--linear_epochs", "1", "--flip_epoch", "1", *SAVES]


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """A CC run: 2 phase-1 epochs, 1 linearized phase-2 epoch, every save."""
    d = tmp_path_factory.mktemp("cc")
    train(d, *PHASE12, "--loaders", "CC")
    return str(d)


RESNET = ["--dataset", "digits", "--train_size", "100", "--test_size", "50", "--batch_size", "50",
          "--pgd_eval_steps", "2", "--no_progress", "--model", "resnet18", "--width", "2",
          "--standard_epochs", "2", "--linear_epochs", "1", *SAVES]


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    """A width-2 ResNet-18 (BatchNorm state) with 2 phase-1 epochs and 1 linearized epoch."""
    d = tmp_path_factory.mktemp("resnet")
    train(d, *RESNET, base=[])
    return str(d)


# --------------------------------------------------------------------------------------
# 1. Files written: loaders, phase-2 dynamics, base checkpoints
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("loaders", ["CC", "AC", "FC"])
def test_loaders_write_the_documented_files(loaders, mlp_run, tmp_path):
    d = mlp_run if loaders == "CC" else str(tmp_path)
    if loaders != "CC":
        train(d, *PHASE12, "--loaders", loaders)
    expected = {"config.json", "metrics.jsonl", "results.pkl", "results.json", "parameters_final.pkl",
                "resume.pkl", "parameters_checkpoint_linear_0.pkl",
                *(f"parameters_checkpoint_{e}.pkl" for e in ("0", "1", "2", *FRACTIONS_IN_2_EPOCHS))}
    assert set(os.listdir(d)) == expected  # nothing else, no temp file left behind
    mode = 0o666 & ~utils._umask()
    for name in expected:
        assert os.stat(os.path.join(d, name)).st_mode & 0o777 == mode, name  # as open() would make it
        if name.startswith("parameters_"):
            raw = utils.restricted_load(os.path.join(d, name))
            assert {"params", "lin_params", "net_state"} <= set(raw), name
            assert finite(raw["params"]) and finite(raw["lin_params"])

    c = {e: ckpt(os.path.join(d, f"parameters_checkpoint_{e}.pkl")) for e in ("0", "0.125", "1", "2")}
    init = c["0"]["params"]
    assert same(c["0"]["lin_params"], init) and same(c["2"]["lin_params"], init)  # phase 1: lin = init
    assert not same(c["0.125"]["params"], init) and not same(c["1"]["params"], c["2"]["params"])
    assert c["0.125"]["meta"]["epoch"] == 0.125 and c["2"]["meta"]["epoch"] == 2
    final, lin0 = ckpt(os.path.join(d, "parameters_final.pkl")), ckpt(os.path.join(d, "parameters_checkpoint_linear_0.pkl"))
    assert same(final["params"], c["2"]["params"])          # theta0 = the phase-1 result
    assert same(final["lin_params"], lin0["lin_params"]) and not same(final["lin_params"], final["params"])
    assert final["meta"]["dynamics"] == "linear" and final["meta"]["model"] == "mlp_skinny"

    res = results(d)
    assert set(res) == {"standard", "linear", "standard_second"} and res["standard_second"] is False
    for phase in ("standard", "linear"):
        assert set(res[phase]) == {"clean", "linf", "l2"} and all(0 <= v <= 1 for v in res[phase].values())
    assert res["standard"]["clean"] > 0.3  # trained: better than chance
    adversarial = [loaders[0] == "A" or (loaders[0] == "F" and e >= 1) for e in range(2)]  # --flip_epoch 1
    assert [m["adversarial"] for m in epochs(d, 1)] == adversarial
    assert [(m["adversarial"], m["dynamics"], m["lr"]) for m in epochs(d, 2)] == [(False, "linear", pytest.approx(0.01))]
    assert [m["phase"] for m in metrics(d) if m["event"] == "eval"] == ["phase 1", "phase 2"]
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    assert config["args"]["loaders"] == loaders and config["devices"] and "git" in config


@pytest.mark.parametrize("flags, dynamics", [
    ([], "linear"),
    (["--centering"], "centered"),
    (["--do_standard_second"], "standard"),
    (["--do_standard_second", "--centering"], "standard_centered"),
    (["--do_standard_second", "--loaders", "CA"], "standard"),  # the reference ignored A here
])
def test_phase2_trains_in_each_dynamics(flags, dynamics, tmp_path):
    train(tmp_path, *MLP, "--standard_epochs", "1", "--linear_epochs", "2", "--second_lr", "0.05",
          "--constant_save", "--constant_save_linear", "--save_models", *flags)
    standard_second = "--do_standard_second" in flags
    records = epochs(tmp_path, 2)
    assert [m["dynamics"] for m in records] == [dynamics] * 2
    assert [m["adversarial"] for m in records] == ["CA" in flags] * 2
    # --do_standard_second continues phase 1's optimizer (lr 0.1), the others start SGD at --second_lr.
    assert [m["lr"] for m in records] == pytest.approx([0.1 if standard_second else 0.05] * 2)
    assert epochs(tmp_path, 1)[0]["lr"] == pytest.approx(0.1)   # run_exp's default --lr: the reference's
    assert results(tmp_path)["standard_second"] is standard_second
    final = ckpt(tmp_path / "parameters_final.pkl")
    assert final["meta"]["dynamics"] == dynamics and final["meta"]["centering"] == ("--centering" in flags)
    # The reference's layout: linearized/centered keep theta0 in 'params' and the trained theta in
    # 'lin_params'; --do_standard_second trains 'params' and keeps the copy theta0 in 'lin_params'.
    trained_key, theta0_key = ("params", "lin_params") if standard_second else ("lin_params", "params")
    theta0 = ckpt(tmp_path / "parameters_checkpoint_1.pkl")["params"]  # the phase-1 result
    assert same(final[theta0_key], theta0)
    for e in (0, 1):  # the per-epoch phase-2 files follow the same rule
        assert same(ckpt(tmp_path / f"parameters_checkpoint_linear_{e}.pkl")[theta0_key], theta0)
    assert same(final[trained_key], ckpt(tmp_path / "parameters_checkpoint_linear_1.pkl")[trained_key])
    assert not same(final[trained_key], ckpt(tmp_path / "parameters_checkpoint_linear_0.pkl")[trained_key])
    assert not same(final[trained_key], theta0) and finite(final[trained_key])


def test_phase1_only_final_checkpoint_holds_the_trained_parameters_twice(tmp_path):
    """As the reference, which copies theta into lin_params before phase 2 whether or not it runs."""
    train(tmp_path, *MLP, "--standard_epochs", "2", "--linear_epochs", "0", "--constant_save", "--save_models",
          "--skip_first_test")
    final, last, init = (ckpt(tmp_path / f"parameters_{n}.pkl") for n in ("final", "checkpoint_2", "checkpoint_0"))
    assert same(final["params"], last["params"]) and same(final["lin_params"], last["params"])
    assert not same(final["lin_params"], init["params"])
    assert final["meta"]["phase"] == 1 and final["meta"]["dynamics"] == "standard"


def test_resnet_batchnorm_moves_in_phase_1_and_is_frozen_in_phase_2(resnet_run):
    c0, c2 = (ckpt(os.path.join(resnet_run, f"parameters_checkpoint_{e}.pkl")) for e in (0, 2))
    final = ckpt(os.path.join(resnet_run, "parameters_final.pkl"))
    assert len(leaves(final["net_state"])) > 0 and final["meta"]["width"] == 2
    assert not same(c0["net_state"], c2["net_state"])    # running averages updated in phase 1
    assert same(final["net_state"], c2["net_state"])     # and frozen in phase 2 (no --loose_bn_second)
    assert same(final["params"], c2["params"]) and not same(final["lin_params"], final["params"])


def test_base_model_skips_phase_1_and_continues_like_its_run(mlp_run, tmp_path):
    base = os.path.join(mlp_run, "parameters_checkpoint_2.pkl")  # the end of phase 1 of mlp_run
    d = tmp_path / "from_base"
    # No --model: the checkpoint says mlp_skinny. --standard_epochs is ignored with a base.
    train(d, "--base_model_path", base, "--linear_epochs", "1", *SAVES)
    assert sorted(p for p in os.listdir(d) if p.startswith("parameters_")) == [
        "parameters_checkpoint_linear_0.pkl", "parameters_final.pkl"]
    assert epochs(d, 1) == [] and len(epochs(d, 2)) == 1
    # The same parameters, data order and attack keys as mlp_run's phase 1 end and phase 2:
    assert results(d) == results(mlp_run)
    mine, theirs = ckpt(d / "parameters_final.pkl"), ckpt(os.path.join(mlp_run, "parameters_final.pkl"))
    assert same(mine["params"], ckpt(base)["params"]) and same(mine["lin_params"], theirs["lin_params"])
    # Standard dynamics after a base model: a fresh SGD at --second_lr.
    d2 = tmp_path / "standard_second"
    train(d2, "--base_model_path", base, "--linear_epochs", "1", "--second_lr", "0.03", "--do_standard_second",
          "--skip_first_test", "--skip_second_test", "--save_models")
    assert [m["lr"] for m in epochs(d2, 2)] == pytest.approx([0.03])
    assert results(d2)["standard"] == {"clean": 0.0, "linf": 0.0, "l2": 0.0}  # skipped tests are 0


# --------------------------------------------------------------------------------------
# 2. Learning
# --------------------------------------------------------------------------------------
def test_standard_training_learns_and_adversarial_training_is_robust(tmp_path):
    """Full digits, 5 epochs of the MLP. At eps 32/255 PGD-10 breaks the clean model far more than
    the adversarially trained one (measured: clean 0.97, PGD 0.35 vs 0.98, 0.72)."""
    full = ["--dataset", "digits", "--batch_size", "64", "--pgd_eval_steps", "10", "--no_progress", *MLP,
            "--standard_epochs", "5", "--linear_epochs", "0", "--eps", "32", "--save_models"]
    for loaders in ("CC", "AC"):
        train(tmp_path / loaders, "--loaders", loaders, base=full)
    cc, ac = results(tmp_path / "CC")["standard"], results(tmp_path / "AC")["standard"]
    assert cc["clean"] >= 0.90 and ac["clean"] >= 0.85
    assert cc["linf"] <= cc["clean"] - 0.3          # the attack works
    assert ac["linf"] >= cc["linf"] + 0.2           # adversarial training helps against it
    assert results(tmp_path / "CC")["linear"] == {"clean": 0.0, "linf": 0.0, "l2": 0.0}  # no phase 2


# --------------------------------------------------------------------------------------
# 3. --resume
# --------------------------------------------------------------------------------------
def assert_same_run(a, b):
    """Two run directories hold the same parameter files, results and per-epoch metrics."""
    names = sorted(p for p in os.listdir(a) if p.startswith("parameters_"))
    assert names == sorted(p for p in os.listdir(b) if p.startswith("parameters_"))
    for name in names:
        ca, cb = ckpt(os.path.join(a, name)), ckpt(os.path.join(b, name))
        for key in ("params", "lin_params", "net_state"):
            assert same(ca[key], cb[key]), (name, key)
    assert results(a) == results(b)
    key = lambda m: (m["phase"], m["epoch"], m["loss"], m["acc"], m["lr"], m["adversarial"])  # noqa: E731
    assert [key(m) for m in metrics(a) if m["event"] == "epoch"] == \
           [key(m) for m in metrics(b) if m["event"] == "epoch"]


RESUMABLE = [*MLP, "--loaders", "FA", "--flip_epoch", "1", "--standard_epochs", "2", "--linear_epochs", "2",
             *SAVES]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    train(d, *RESUMABLE)
    return str(d)


class Interrupt(Exception):
    pass


def interrupt_after_saves(monkeypatch, n):
    """Make run_exp stop (like a kill) right after its n-th resume checkpoint."""
    real, calls = experiment.save_resume, []

    def save_then_stop(*args):
        real(*args)
        calls.append(1)
        if len(calls) == n:
            raise Interrupt
    monkeypatch.setattr(experiment, "save_resume", save_then_stop)


# Resume checkpoints of RESUMABLE: 1, 2 after the phase-1 epochs, 3 after the phase-1 evaluation,
# 4, 5 after the phase-2 epochs, 6 at the end.
@pytest.mark.parametrize("n, phase, epoch", [(1, 1, 1), (3, 2, 0), (4, 2, 1)])
def test_resume_continues_exactly(n, phase, epoch, uninterrupted, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        interrupt_after_saves(m, n)
        with pytest.raises(Interrupt):
            train(tmp_path, *RESUMABLE)
    assert not os.path.exists(tmp_path / "parameters_final.pkl")
    train(tmp_path, *RESUMABLE, "--resume")
    assert f"resuming phase {phase} at epoch {epoch}" in capsys.readouterr().out
    assert_same_run(tmp_path, uninterrupted)
    # A finished run resumes to nothing.
    train(tmp_path, *RESUMABLE, "--resume")
    assert "had already finished" in capsys.readouterr().out


def test_resume_restores_batchnorm_state(resnet_run, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_after_saves(m, 1)
        with pytest.raises(Interrupt):
            train(tmp_path, *RESNET, base=[])
    train(tmp_path, *RESNET, "--resume", base=[])
    assert_same_run(tmp_path, resnet_run)


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real process killed -9 at a random moment after its first epoch: every .pkl it left
    loads, and --resume ends on exactly the parameters of an uninterrupted run."""
    argv = ["--dataset", "digits", "--batch_size", "32", "--pgd_eval_steps", "2", "--test_size", "100",
            "--no_progress", *MLP, "--loaders", "AC", "--standard_epochs", "4", "--linear_epochs", "1",
            "--constant_save", "--save_models", "--random_seed", "3"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "run_exp.py", *argv, "--save_path", str(killed)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "resume.pkl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.3))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    assert not (killed / "parameters_final.pkl").exists()
    for name in os.listdir(killed):
        if name.endswith(".pkl"):
            utils.restricted_load(str(killed / name))  # complete, or it would raise
        else:
            # the lock file stays after SIGKILL (the OS released its lock: the --resume below takes it)
            assert name in ("config.json", "metrics.jsonl", utils.LOCK_FILE) or name.endswith(".tmp"), name
    progress = utils.restricted_load(str(killed / "resume.pkl"))["progress"]
    assert (progress["phase"], progress["epoch"]) < (2, 1)

    resumed = cli(*argv, "--save_path", killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming phase {progress['phase']} at epoch {progress['epoch']}" in resumed.stdout
    reference = tmp_path / "reference"
    train(reference, *argv, base=[])
    assert_same_run(killed, reference)


# --------------------------------------------------------------------------------------
# 4. Crash safety
# --------------------------------------------------------------------------------------
def test_kill_9_during_checkpoint_saves_leaves_no_partial_pkl(tmp_path):
    """A process saving a 32 MB checkpoint in a loop is killed -9 at random moments: every .pkl
    present loads completely; at most temp files are left."""
    code = textwrap.dedent(f"""
        import numpy as np, checkpoints
        w = np.arange(4_000_000, dtype=np.float32).reshape(2000, 2000)
        print("ready", flush=True)
        for i in range(10 ** 9):
            checkpoints.save_checkpoint({str(tmp_path)!r} + f"/ck_{{i % 3}}.pkl", {{"m": {{"w": w}}}}, {{"m": {{"w": w}}}},
                                  {{}}, {{"i": i}})
    """)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.2, 1.5))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
        proc.stdout.close()
    names = os.listdir(tmp_path)
    pkls = [n for n in names if n.endswith(".pkl")]
    assert pkls, "no checkpoint was completed"
    expected = np.arange(4_000_000, dtype=np.float32).reshape(2000, 2000)
    for name in pkls:
        c = ckpt(tmp_path / name)
        assert np.array_equal(c["params"]["m"]["w"], expected) and np.array_equal(c["lin_params"]["m"]["w"], expected)
    for name in set(names) - set(pkls):
        assert name.startswith(".ck_") and name.endswith(".tmp"), name


def test_unwritable_save_path_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    targets = [str(blocker / "run")]
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        targets.append(str(ro / "run"))
    for target in targets:
        line = one_line_error(cli(*TINY, *MLP, "--standard_epochs", "1", "--save_path", target))
        assert line.startswith(f"error: --save_path {target} is not writable: ")
    assert blocker.read_text() == "not a directory"


# --------------------------------------------------------------------------------------
# 5. NaN guard
# --------------------------------------------------------------------------------------
def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_last_good_checkpoint(tmp_path):
    proc = cli(*TINY, *MLP, "--standard_epochs", "1", "--linear_epochs", "2", "--second_lr", "1e38",
               "--constant_save", "--constant_save_linear", "--save_path", tmp_path)
    line = one_line_error(proc)
    assert line.startswith("error: non-finite loss (") and "in phase 2, epoch 0, batch " in line, line
    assert "phase 1 epoch 0" in proc.stdout
    assert not [p for p in os.listdir(tmp_path) if "linear" in p or p.endswith(".tmp")]
    last = ckpt(tmp_path / "parameters_checkpoint_1.pkl")
    assert finite(last["params"]) and last["meta"]["epoch"] == 1
    resume = utils.restricted_load(str(tmp_path / "resume.pkl"))
    assert (resume["progress"]["phase"], resume["progress"]["epoch"]) == (2, 0) and finite(resume["state"])


def test_finite_loss_but_nan_update_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    """The loss is taken before the update: a NaN update on an epoch's last batch must stop the
    run before that epoch's checkpoints are written."""
    real, calls = training.make_train_step, []

    def nan_lr_on_4th_linear_step(apply, dynamics, is_training, optimizer):
        step = real(apply, dynamics, is_training, optimizer)

        def wrapped(state, theta0, x, y):
            calls.append(dynamics)
            if calls.count("linear") == 4 and dynamics == "linear":  # the last batch of epoch 0
                state = state._replace(opt_state=training.set_lr(state.opt_state, float("nan")))
            return step(state, theta0, x, y)
        return wrapped
    monkeypatch.setattr(training, "make_train_step", nan_lr_on_4th_linear_step)
    with pytest.raises(UserError, match=r"non-finite parameters or optimizer state in phase 2, epoch 0, batch 3"):
        train(tmp_path, *MLP, "--standard_epochs", "1", "--linear_epochs", "2", "--constant_save_linear")
    assert not [p for p in os.listdir(tmp_path) if "linear" in p]
    resume = utils.restricted_load(str(tmp_path / "resume.pkl"))
    assert (resume["progress"]["phase"], resume["progress"]["epoch"]) == (2, 0) and finite(resume["state"])


# --------------------------------------------------------------------------------------
# 6. Bad input: exit 2, one line, no traceback, no existing file changed
# --------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def _bad_checkpoints(d, mlp_run, resnet_run):
    """Checkpoint files for the bad-input cases, written under `d`."""
    good = ckpt(os.path.join(mlp_run, "parameters_final.pkl"))
    init100, _ = __import__("models").get_model("mlp_skinny", 100)
    p100, s100 = init100(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), True)
    paths = {"resnet": os.path.join(resnet_run, "parameters_final.pkl"),
             "mlp": os.path.join(mlp_run, "parameters_final.pkl")}
    for name, (p, meta) in {"classes_meta": (p100, {**good["meta"], "num_classes": 100}),
                            "classes_nometa": (p100, None)}.items():
        paths[name] = os.path.join(d, f"{name}.pkl")
        checkpoints.save_checkpoint(paths[name], p, p, s100, None if meta is None else {k: v for k, v in meta.items()
                                                                                  if k != "dataset"})
    paths["evil"] = os.path.join(d, "evil.pkl")
    with open(paths["evil"], "wb") as f:
        pickle.dump({"params": _Evil(), "lin_params": {}, "net_state": {}}, f)
    paths["truncated"] = os.path.join(d, "truncated.pkl")
    with open(paths["mlp"], "rb") as f:
        raw = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(raw[: len(raw) // 2])
    return paths


BAD = {  # id: (flags, the exact error line; {d} is a scratch dir, {run} the existing run dir)
    "loaders-CX": (["--loaders", "CX"], "--loaders must be two letters from C, A, F (got 'CX')"),
    "loaders-C": (["--loaders", "C"], "--loaders must be two letters from C, A, F (got 'C')"),
    "negative-eps": (["--eps", "-1"], "--eps must be >= 0 (got -1.0)"),
    "inf-second_lr": (["--second_lr", "inf"], "--second_lr must be finite and >= 0 (got inf)"),
    "negative-lr": (["--lr", "-0.1"], "--lr must be finite and >= 0 (got -0.1)"),
    "negative-train_size": (["--train_size", "-10"], "--train_size must be positive (got -10)"),
    "missing-base": (["--base_model_path", "{d}/nope.pkl"], "file not found: {d}/nope.pkl"),
    "base-other-model": (["--base_model_path", "{mlp}", "--model", "mlp_wide"],
                         "{mlp} was saved with model=mlp_skinny but model=mlp_wide was requested"),
    "base-other-width": (["--base_model_path", "{resnet}", "--width", "4"],
                         "{resnet} was saved with width=2 but width=4 was requested"),
    "base-other-classes": (["--base_model_path", "{classes_meta}"],
                           "{classes_meta} was saved with num_classes=100 but num_classes=10 was requested"),
    "base-other-classes-no-meta": (["--base_model_path", "{classes_nometa}"],
                                   "{classes_nometa} ['params'] does not fit the model: 'linear_2/b' has "
                                   "shape (100,) in the file but the model expects (10,)"),
    "base-hostile-pickle": (["--base_model_path", "{evil}"],
                            "{evil} is not a safe pickle: refusing to load global 'posix.system'"),
    "base-truncated": (["--base_model_path", "{truncated}"],
                       "{truncated} is corrupt or truncated (UnpicklingError: pickle data was truncated)"),
    "resume-nothing": (["--resume", "--save_path", "{d}"], "--resume: no resume.pkl in {d}; nothing to resume"),
    "resume-other-flags": ([*PHASE12, "--loaders", "CC", "--eps", "8", "--resume"],
                           "--resume: --eps is 8.0 but the interrupted run used 4.0"),
    "cifar-offline": (["--dataset", "cifar10", "--data_dir", "{d}/data"],
                      "cifar10 is not in {d}/data/cifar-10-batches-py and could not be downloaded (ConnectionError: "
                      "HTTPSConnection(host='www.cs.toronto.edu', port=443): Failed to resolve "
                      "'www.cs.toronto.edu' ([Errno -3] network blocked by the test)). Download "
                      "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into --data_dir "
                      "(it holds 'cifar-10-batches-py/'), or use --dataset digits, which needs no download"),
}
# No network in a test, whatever the machine: name resolution fails as it does offline.
OFFLINE = ("import socket\n"
           "def _offline(*a, **k):\n"
           "    raise socket.gaierror(-3, 'network blocked by the test')\n"
           "socket.getaddrinfo = _offline")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_changes_nothing(case, mlp_run, resnet_run, tmp_path):
    flags, message = BAD[case]
    paths = _bad_checkpoints(str(tmp_path), mlp_run, resnet_run)
    fill = lambda s: s.format(d=tmp_path, run=mlp_run, **paths)  # noqa: E731
    argv = [*TINY, *MLP, "--save_path", mlp_run, *map(fill, flags)]
    if case == "base-other-width":
        argv.remove("mlp_skinny"), argv.remove("--model")    # the model comes from the checkpoint
    if case == "resume-other-flags":
        argv = [*TINY, "--save_path", mlp_run, *flags]
    before = snapshot(mlp_run, resnet_run, tmp_path)
    proc = cli(*argv, cwd=tmp_path, prelude=OFFLINE if case == "cifar-offline" else "")
    assert one_line_error(proc) == "error: " + fill(message)
    assert snapshot(mlp_run, resnet_run, tmp_path) == before
    assert not (tmp_path / "pwned_by_pickle").exists()
    if case == "cifar-offline":
        assert not os.path.exists(tmp_path / "data" / "cifar-10-batches-py")
