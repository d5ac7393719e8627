"""Two real JAX processes, as a multi-host job runs, agree with one process.

Each script is started as a command line, as `srun`/`mpirun` or a user would: two processes
joined by jax.distributed through a coordinator on a free 127.0.0.1 port (NTK_NUM_PROCESSES,
NTK_PROCESS_ID, NTK_COORDINATOR; parallel.init_distributed), CPU collectives over gloo, two
forced CPU devices per process, so the mesh spans 4 devices in 2 processes. The same command on
one process with one device is the reference:

- run_exp.py: adversarial phase 1 and adversarial linearized phase 2 (PGD-20 inside training),
  batch 16 over 110 images (the last batch of 14 does not divide by 4), PGD evaluations after
  phase 2 (the one after phase 1 is skipped: it compiles the same kind of functions again);
- eval_and_make_adv.py --attack ensemble --save_examples on the 1-process checkpoint, batch 10
  over 30 images (padded batches: 10 does not divide by 4; --test_size is now the class-balanced
  subset, so a multiple of the 10 classes);
- calculate_kernel.py on that checkpoint, several gradient chunks.

Accuracies, counts and predictions must be equal, adversarial images, parameters and kernels
equal within float tolerance, and process 1 (given output paths of its own) must write nothing.
A second test kills one process of a running job and checks that the other exits with an error
within the distributed timeout instead of hanging. Every process runs in its own process group,
under a time limit, and is killed by the fixture whatever happens.
"""
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow   # multi-process: `pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_TIMEOUT = 170  # seconds, per group of jobs
DEVICES_PER_PROCESS = 2


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Started processes, each in its own session (process group); `kill_all` ends every group."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path, num_processes=1, process_id=0, port=None, devices=1, timeout_s=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NTK_NUM_PROCESSES", "NTK_PROCESS_ID",
                                                                         "NTK_COORDINATOR", "NTK_DISTRIBUTED"))}
        env.update(JAX_PLATFORMS="cpu", NTK_DATA_PARALLEL="1", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
        if num_processes > 1:
            env.update(NTK_NUM_PROCESSES=str(num_processes), NTK_PROCESS_ID=str(process_id),
                       NTK_COORDINATOR=f"127.0.0.1:{port}")
            if timeout_s:
                env["NTK_DISTRIBUTED_TIMEOUT"] = str(timeout_s)
        log = open(log_path, "w")
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        p.log_path = log_path
        log.close()
        self.procs.append(p)
        return p

    def job(self, argv_of, log_stem, n=2, timeout_s=None):
        """`n` processes of one job; argv_of(i) gives process i's arguments."""
        port = free_port()
        return [self.start(argv_of(i), f"{log_stem}_p{i}.log", n, i, port, DEVICES_PER_PROCESS, timeout_s)
                for i in range(n)]

    def wait(self, procs, timeout):
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"{p.args} did not finish within {timeout} s:\n{tail(p)}")
        for p in procs:
            assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{tail(p)}"

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def tail(p, n=4000):
    with open(p.log_path, errors="replace") as f:
        return f.read()[-n:]


@pytest.fixture
def procs():
    registry = Procs()
    yield registry
    registry.kill_all()


def files_in(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs) if os.path.exists(path) else []


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


# --------------------------------------------------------------------------------------
RUN_EXP = ["run_exp.py", "--dataset", "digits", "--model", "mlp_skinny", "--train_size", "110", "--test_size", "30",
           "--batch_size", "16", "--standard_epochs", "1", "--linear_epochs", "1", "--loaders", "AA", "--eps", "8",
           "--pgd_eval_steps", "3", "--skip_first_test", "--save_models", "--no_progress"]


def test_two_processes_equal_one(tmp_path, procs):
    one, two = tmp_path / "one", tmp_path / "two"
    own = {0: "", 1: "_p1"}  # process 1 gets output paths of its own, to show it writes nothing

    # 1. run_exp.py: one process (1 device) and two processes (2 x 2 devices) side by side.
    single = procs.start(RUN_EXP + ["--save_path", str(one)], str(tmp_path / "run_exp_1p.log"))
    job = procs.job(lambda i: RUN_EXP + ["--save_path", f"{two}{own[i]}"], str(tmp_path / "run_exp_2p"))
    procs.wait([single], JOB_TIMEOUT)

    # 2. Meanwhile, eval_and_make_adv.py (ensemble) and calculate_kernel.py on the 1-process
    #    checkpoint, on one process and on two.
    ckpt = str(one / "parameters_final.pkl")
    ev = ["eval_and_make_adv.py", "--model_path", ckpt, "--linear", "--attack", "ensemble", "--pgd_steps", "5",
          "--n_target_classes", "2", "--test_size", "30", "--batch_size", "10", "--eps", "8", "--save_examples"]
    kn = ["calculate_kernel.py", "--model_path", ckpt, "--dataset_size", "30", "--class_index", "-1",
          "--memory_gb", "0.003", "--use_linear_params"]
    started = [procs.start(ev + ["--bonus_dir", "ev1"], str(tmp_path / "eval_1p.log")),
               procs.start(kn + ["--bonus_dir", "k1"], str(tmp_path / "kernel_1p.log"))]
    started += procs.job(lambda i: ev + ["--bonus_dir", "ev2" + own[i]], str(tmp_path / "eval_2p"))
    started += procs.job(lambda i: kn + ["--bonus_dir", "k2" + own[i]], str(tmp_path / "kernel_2p"))

    procs.wait(job, JOB_TIMEOUT)
    for i, p in enumerate(job):
        assert f"process {i} of 2: {DEVICES_PER_PROCESS} local device(s), 4 in all" in tail(p, 10**6)
    with open(two / "config.json") as f:
        assert len(json.load(f)["devices"]) == 4
    assert files_in(f"{two}_p1") == []

    with open(one / "results.json") as f1, open(two / "results.json") as f2:
        res1, res2 = json.load(f1), json.load(f2)
    assert res1 == res2  # accuracies: exact
    assert res1["linear"]["clean"] > 0.3 and res1["linear"]["linf"] < res1["linear"]["clean"]

    def epochs(d):
        with open(d / "metrics.jsonl") as f:
            return [json.loads(line) for line in f if '"event": "epoch"' in line]

    e1, e2 = epochs(one), epochs(two)
    assert [e["acc"] for e in e1] == [e["acc"] for e in e2] and len(e1) == 2
    np.testing.assert_allclose([e["loss"] for e in e2], [e["loss"] for e in e1], rtol=1e-4)
    c1, c2 = load(one / "parameters_final.pkl"), load(two / "parameters_final.pkl")
    worst = {}
    for key in ("params", "lin_params"):
        for mod in c1[key]:
            for name in c1[key][mod]:
                worst[key] = max(worst.get(key, 0.0), max_rel(c1[key][mod][name], c2[key][mod][name]))
    print("run_exp, max relative |1 process - 2 processes| of the parameters:", worst)
    assert max(worst.values()) < 1e-4, worst

    procs.wait(started, JOB_TIMEOUT)
    assert files_in(one / "ev2_p1") == [] and files_in(one / "k2_p1") == []

    r1, r2 = (load(one / d / "test_results_test_results.pkl") for d in ("ev1", "ev2"))
    with open(one / "ev1" / "test_results_test_results.json") as f1, \
            open(one / "ev2" / "test_results_test_results.json") as f2:
        s1, s2 = json.load(f1), json.load(f2)
    for key in ("acc_clean", "acc_robust", "correct_clean", "correct_robust", "per_attack", "n_images"):
        assert s1[key] == s2[key], key
    assert s1["attack"] == "ensemble" and s1["n_images"] == 30
    for key in ("predictions_clean", "predictions_dirty", "labels"):
        np.testing.assert_array_equal(r1[key], r2[key])
    comp = max(max_rel(r1[c][k], r2[c][k]) for c in ("components_clean", "components_dirty") for k in ("f", "df"))
    a1, a2 = (load(one / d / "adv_examples_test_results.pkl") for d in ("ev1", "ev2"))
    adv = float(np.abs(a1["images"] - a2["images"]).max())
    k1, k2 = (load(one / d / "saved_kernel_30.pkl") for d in ("k1", "k2"))
    kern = max_rel(k1["kernel"], k2["kernel"])
    print(f"eval: components {comp:.2e} relative, adversarial images {adv:.2e} absolute; kernel {kern:.2e} relative")
    assert comp < 1e-4 and adv < 1e-5 and kern < 1e-5
    np.testing.assert_array_equal(k1["indices"], k2["indices"])
    assert (k1["engine"]["devices"], k2["engine"]["devices"]) == (1, 4)
    assert k2["engine"]["block_evaluations"] >= 2  # several chunks, some padded to the 4 devices


def test_killed_process_stops_the_others(tmp_path, procs):
    """SIGKILL one process of a running 2-process run_exp.py job (the coordinator, process 0, in
    one job; process 1 in another): the survivor must exit non-zero within the distributed
    timeout, not hang."""
    timeout_s = 10
    long_run = RUN_EXP[:1] + ["--dataset", "digits", "--model", "mlp_skinny", "--train_size", "200", "--batch_size",
                              "16", "--standard_epochs", "500", "--linear_epochs", "0", "--loaders", "CC",
                              "--skip_first_test", "--no_progress"]
    jobs = {victim: procs.job(lambda i, v=victim: long_run + ["--save_path", str(tmp_path / f"kill{v}")],
                              str(tmp_path / f"kill{victim}"), timeout_s=timeout_s)
            for victim in (0, 1)}
    deadline = time.monotonic() + JOB_TIMEOUT
    for victim, job in jobs.items():  # wait until both processes of both jobs train
        while not all("phase 1 epoch 0:" in tail(p, 10**6) for p in job):
            assert all(p.poll() is None for p in job), f"a process ended early:\n{tail(job[0])}\n{tail(job[1])}"
            assert time.monotonic() < deadline, "the jobs did not start training"
            time.sleep(0.5)
    killed_at = {}
    for victim, job in jobs.items():
        os.killpg(job[victim].pid, signal.SIGKILL)
        killed_at[victim] = time.monotonic()
    for victim, job in jobs.items():
        survivor = job[1 - victim]
        try:
            survivor.wait(timeout=timeout_s + 40)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still runs {timeout_s + 40} s after process {victim} was killed")
        waited = time.monotonic() - killed_at[victim]
        log = tail(survivor, 20000)
        print(f"killed process {victim}: process {1 - victim} exited {survivor.returncode} after {waited:.1f} s")
        assert survivor.returncode != 0
        # How the survivor learns of it depends on where the kill caught the collective: the
        # coordinator's heartbeat, a reset connection, or gloo aborting on the dead peer's
        # half-sent message (seen once in CI: SIGABRT 0.2 s after the kill).
        died = ("another task died", "Connection reset", "unhealthy", "gloo::EnforceNotMet")
        assert any(s in log for s in died), log[-3000:]


def test_distributed_settings_from_the_environment():
    import parallel
    assert parallel.distributed_settings({}) is None
    assert parallel.distributed_settings({"NTK_DISTRIBUTED": "1"}) == {}
    env = {"NTK_NUM_PROCESSES": "2", "NTK_PROCESS_ID": "1", "NTK_COORDINATOR": "10.0.0.1:1234",
           "NTK_DISTRIBUTED_TIMEOUT": "30"}
    assert parallel.distributed_settings(env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
        "initialization_timeout": 30, "heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 30}
    for bad, words in (({"NTK_NUM_PROCESSES": "2"}, "needs all three"),
                       ({**env, "NTK_PROCESS_ID": "2"}, "must lie in"),
                       ({**env, "NTK_NUM_PROCESSES": "two"}, "must be an integer"),
                       ({**env, "NTK_COORDINATOR": "host"}, "host:port"),
                       ({**env, "NTK_DISTRIBUTED_TIMEOUT": "0"}, "seconds >= 1")):
        with pytest.raises(parallel.DistributedError, match=words):
            parallel.distributed_settings(bad)
    assert parallel.is_writer()  # a single process writes


def test_incomplete_environment_is_a_user_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", NTK_NUM_PROCESSES="2")
    r = subprocess.run([sys.executable, "calculate_kernel.py", "--model_path", str(tmp_path / "x.pkl")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: NTK_NUM_PROCESSES set but not NTK_COORDINATOR, NTK_PROCESS_ID: a multi-process job needs all three"]
