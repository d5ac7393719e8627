"""One bounded check of a GPU machine: does the project run there, and how fast.

Run through bench/gpu_check.sh (which installs carried wheels first). Every stage runs in its
own subprocess, in its own process group, under a time cap taken from one overall budget, so
the whole check ends within --budget_s however the machine behaves; a stage that does not fit in
what is left is skipped and logged as such. Each stage appends one JSON line to
OUT/gpu_check.jsonl; the stages' own output goes to OUT/gpu_check.log.

Stages, in order (the most telling first, so a short budget keeps them):
  probe       device name and kind, JAX version, device count and memory, the matmul peaks this
              card reaches through XLA: bf16, fp32 at JAX's default precision (TF32 on NVIDIA
              GPUs since Ampere) and fp32 at "highest" precision (true fp32)
  smoke       the digits pipeline through the real scripts: run_exp.py (adversarial phase 1 and
              linearized phase 2), eval_and_make_adv.py --attack ensemble, calculate_kernel.py,
              with their accuracies checked against chance
  train_B     bench/bench_train.py at batch B (128 first, then 512): phase-1 step, linearized
              step and PGD-20, images/s, XLA's FLOP count of each step
  eval_std    PGD-100 (L-inf, eps 4/255, batch 100, the reference's evaluation) of 1,000
              CIFAR-shaped images, standard dynamics: warm-up batch (compiles), then the timed run
  eval_lin    the same for linearized dynamics (the cost of examples 3-4's evaluations)
  ntk         bench/bench_ntk.py, engine only, n = 500 and 2,000, class 0
Each stage's line holds its wall time, its exit status and the largest GPU memory in use while
it ran (nvidia-smi, polled; the stages run with XLA_PYTHON_CLIENT_PREALLOCATE=false so the
figure is what they allocate, not JAX's default 75% reservation). The last line, `summary`,
gives every train step as a fraction of the measured bf16 and fp32 peaks and of the datasheet
figures, the peak memory, and estimated wall times of the reference README's examples 1-4
(CIFAR-10, ResNet-18, batch 128) on this card, built from the measured steps (formulas in the
line itself).

--cpu-smoke runs every stage on the CPU with tiny sizes (a small MLP instead of ResNet-18), to
check this script itself; its figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# H200 SXM datasheet figures (dense), TFLOP/s: leads, not measurements.
DATASHEET_TFLOPS = {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000

GPU = {
    "budget_s": 420, "model": "resnet18", "width": 64, "matmul_n": 8192, "matmul_repeats": 10,
    "train_batches": (128, 512), "train_repeats": 5,
    "eval_images": 1000, "eval_batch": 100, "eval_steps": 100,
    "ntk_n": "500,2000", "ntk_memory_gb": 16.0,
    "smoke": {"train_size": 500, "test_size": 200, "batch_size": 64, "standard_epochs": 2, "linear_epochs": 1,
              "loaders": "AA", "first_test": True, "pgd_eval_steps": 10, "attack": "ensemble", "eval_steps": 10,
              "eval_batch": 100, "kernel_n": 100, "min_acc": 0.5},
    "caps": {"probe": 60, "smoke": 110, "train_128": 120, "eval_std": 75, "eval_lin": 90, "ntk": 150,
             "train_512": 120},
}
CPU_SMOKE = {
    "budget_s": 240, "model": "mlp_skinny", "width": 4, "matmul_n": 256, "matmul_repeats": 3,
    "train_batches": (8, 16), "train_repeats": 2,
    "eval_images": 40, "eval_batch": 20, "eval_steps": 3,
    "ntk_n": "8,16", "ntk_memory_gb": 0.5,
    # Fewer distinct functions to compile than on the GPU (clean training, one attack): on a CPU
    # the time goes into compiling.
    "smoke": {"train_size": 60, "test_size": 20, "batch_size": 16, "standard_epochs": 1, "linear_epochs": 1,
              "loaders": "CC", "first_test": False, "pgd_eval_steps": 2, "attack": "pgd", "eval_steps": 2,
              "eval_batch": 10, "kernel_n": 20, "min_acc": 0.2},
    "caps": {"probe": 40, "smoke": 100, "train_8": 40, "eval_std": 30, "eval_lin": 30, "ntk": 60, "train_16": 40},
}
MIN_STAGE_S = 15  # a stage with less time than this left is skipped


# --------------------------------------------------------------------------------------
# Helpers run in their own subprocess (they start JAX; the driver never does)
# --------------------------------------------------------------------------------------
def probe(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    dev = jax.devices()[0]
    out = {"device_kind": dev.device_kind, "platform": dev.platform, "device_count": jax.device_count(),
           "jax": jax.__version__, "python": platform.python_version()}
    try:
        import haiku
        out["haiku"] = haiku.__version__
        out["haiku_from"] = os.path.dirname(os.path.dirname(haiku.__file__))
    except Exception as e:  # noqa: BLE001 - the scripts cannot run; say why here, first
        out["haiku"] = f"not importable: {type(e).__name__}: {e}"
    stats = dev.memory_stats() or {}
    out["memory_limit_gib"] = round(stats.get("bytes_limit", 0) / 2 ** 30, 1) or None
    n = args.matmul_n
    rng = np.random.default_rng(0)
    a32 = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b32 = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    cases = {"bf16": (jax.jit(jnp.dot), a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)),
             "fp32_default": (jax.jit(jnp.dot), a32, b32),
             "fp32_highest": (jax.jit(lambda a, b: jnp.dot(a, b, precision="highest")), a32, b32)}
    for name, (fn, a, b) in cases.items():
        fn(a, b).block_until_ready()
        times = []
        for _ in range(args.matmul_repeats):
            t = time.perf_counter()
            fn(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        out[f"matmul_{name}_tflops"] = round(2 * n ** 3 / float(np.median(times)) / 1e12, 3)
    out["matmul_n"] = n
    out["peak_bytes_in_use_gib"] = round((dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 30, 2)
    print(json.dumps(out), flush=True)


def eval_bench(args):
    """PGD evaluation of random CIFAR-shaped images under random weights, through
    attacks.evaluate with the configuration eval_and_make_adv.py uses by default."""
    import jax
    import numpy as np

    import attacks
    import models
    from common import random_variables

    init, apply = models.get_model(args.model, 10, args.width)
    params, state = random_variables(init, (1, 32, 32, 3))
    theta = jax.tree_util.tree_map(lambda p: p * 1.01, params)  # theta != theta0 for the linear model
    dynamics = "linear" if args.linear else "standard"
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.eval_images, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.eval_images).astype(np.int32)
    eps = 4 / 255
    cfg = attacks.attack_from_args(argparse.Namespace(attack="pgd"), "linf", eps, args.eval_steps)
    predict = attacks.make_predict(apply, dynamics)

    def run(n):
        t = time.perf_counter()
        r = attacks.evaluate(predict, (theta, params, state), x[:n], y[:n], batch_size=args.eval_batch,
                             attack=cfg, key=jax.random.PRNGKey(0))
        return time.perf_counter() - t, r

    warm_s, _ = run(args.eval_batch)  # one batch: compiles
    seconds, r = run(args.eval_images)
    dev = jax.devices()[0]
    out = {"dynamics": dynamics, "model": args.model, "width": args.width, "images": args.eval_images,
           "batch_size": args.eval_batch, "steps": args.eval_steps, "eps": eps, "loop": attacks.loop_mode(),
           "warmup_one_batch_s": round(warm_s, 3), "seconds": round(seconds, 3),
           "img_per_s": round(args.eval_images / seconds, 2), "acc_clean": r["acc_clean"], "acc_adv": r["acc_adv"],
           "peak_bytes_in_use_gib": round((dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2 ** 30, 2)}
    print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
class GpuMemoryPoller:
    """Largest `nvidia-smi` memory.used (MiB, all GPUs summed) since the last `take()`."""

    def __init__(self, interval_ms=200):
        self.peak, self.proc = None, None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        self.proc = subprocess.Popen([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                used = float(line.strip())
            except ValueError:
                continue
            self.peak = used if self.peak is None else max(self.peak, used)

    def take(self):
        peak, self.peak = self.peak, None
        return peak

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Driver:
    def __init__(self, args, conf):
        self.args, self.conf = args, conf
        self.t0 = time.monotonic()
        os.makedirs(args.out, exist_ok=True)
        self.jsonl = os.path.join(args.out, "gpu_check.jsonl")
        self.logfile = os.path.join(args.out, "gpu_check.log")
        open(self.jsonl, "w").close()
        open(self.logfile, "w").close()
        self.work = args.work
        os.makedirs(self.work, exist_ok=True)
        self.poller = GpuMemoryPoller()
        self.results = {}
        self.current = None  # the stage's running process: its group is killed with the driver
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._die)
        # One compilation cache for every stage (the scripts' NTK_JAX_CACHE_DIR, and JAX's own
        # variables for the benchmarks): a fresh one on a GPU, the user's on a CPU smoke run.
        cache = os.path.join(self.work, "jax_cache")
        if args.cpu_smoke:
            cache = os.environ.get("NTK_JAX_CACHE_DIR", os.path.expanduser("~/.cache/ntk_evolution/jax"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
                        NTK_JAX_CACHE_DIR=cache, JAX_COMPILATION_CACHE_DIR=cache,
                        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if not cache:  # NTK_JAX_CACHE_DIR= (empty) turns caching off
            del self.env["JAX_COMPILATION_CACHE_DIR"]
        if args.cpu_smoke:
            self.env["JAX_PLATFORMS"] = "cpu"

    def _die(self, signum, frame):
        if self.current is not None:
            _kill_group(self.current)
        self.poller.close()
        raise SystemExit(128 + signum)

    def left(self):
        return self.args.budget_s - (time.monotonic() - self.t0)

    def emit(self, rec):
        rec = {"t_s": round(time.monotonic() - self.t0, 1), **rec}
        line = json.dumps(rec, default=str)
        with open(self.jsonl, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        return rec

    def run(self, stage, cmds, parse_json=True, post=None, **extra):
        """Run `cmds` (a list of argv lists) one after the other as one stage under its cap;
        `post(rec)`, if given, adds its checks to a successful stage's record."""
        cap = min(self.conf["caps"][stage] * self.args.cap_scale, self.left())
        if cap < MIN_STAGE_S:
            rec = self.emit({"stage": stage, "ok": False, "skipped": f"{self.left():.0f} s of the budget left", **extra})
            self.results[stage] = rec
            return rec
        deadline = time.monotonic() + cap
        self.poller.take()
        records, rc, t = [], 0, time.monotonic()
        timed_out = False
        with open(self.logfile, "a") as log:
            for cmd in cmds:
                log.write(f"\n===== {stage}: {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=log,
                                        text=True, start_new_session=True)
                self.current = proc
                try:
                    out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    out, _ = proc.communicate()  # what it printed before the kill
                    timed_out = True
                finally:
                    if proc.poll() is None:
                        _kill_group(proc)
                    self.current = None
                log.write(out)
                log.flush()
                if parse_json:
                    for line in out.splitlines():
                        if line.startswith("{"):
                            try:
                                records.append(json.loads(line))
                            except json.JSONDecodeError:
                                pass
                rc = proc.returncode
                if timed_out or rc != 0:
                    break
        rec = {"stage": stage, "ok": rc == 0 and not timed_out, "rc": rc, "timed_out": timed_out, "cap_s": round(cap),
               "seconds": round(time.monotonic() - t, 2), "peak_gpu_mem_mib": self.poller.take(), **extra,
               "records": records}
        if post is not None and rec["ok"]:
            post(rec)
        self.results[stage] = rec
        return self.emit(rec)

    # ----------------------------------------------------------------------------------
    def py(self, *argv):
        return [self.args.python, *map(str, argv)]

    def stage_probe(self):
        c = self.conf
        self.run("probe", [self.py("bench/gpu_check.py", "--probe", "--matmul_n", c["matmul_n"],
                                   "--matmul_repeats", c["matmul_repeats"])])

    def stage_smoke(self):
        s = self.conf["smoke"]
        d = os.path.join(self.work, "smoke")
        shutil.rmtree(d, ignore_errors=True)
        ckpt = os.path.join(d, "parameters_final.pkl")
        cmds = [
            self.py("run_exp.py", "--dataset", "digits", "--model", "mlp_skinny", "--train_size", s["train_size"],
                    "--test_size", s["test_size"], "--batch_size", s["batch_size"], "--standard_epochs",
                    s["standard_epochs"], "--linear_epochs", s["linear_epochs"], "--loaders", s["loaders"], "--eps", "8",
                    "--pgd_eval_steps", s["pgd_eval_steps"], "--save_models", "--no_progress", "--save_path", d,
                    *([] if s["first_test"] else ["--skip_first_test"])),
            self.py("eval_and_make_adv.py", "--model_path", ckpt, "--linear", "--attack", s["attack"], "--eps", "8",
                    "--pgd_steps", s["eval_steps"], "--n_target_classes", "2", "--test_size", s["test_size"],
                    "--batch_size", s["eval_batch"], "--save_examples", "--bonus_dir", "ev"),
            self.py("calculate_kernel.py", "--model_path", ckpt, "--dataset_size", s["kernel_n"],
                    "--use_linear_params", "--bonus_dir", "k"),
        ]
        def check(rec):
            try:
                with open(os.path.join(d, "results.json")) as f:
                    res = json.load(f)
                with open(os.path.join(d, "ev", "test_results_test_results.json")) as f:
                    ev = json.load(f)
                checks = {"run_exp_phase2_clean": res["linear"]["clean"],
                          "eval_clean": ev["acc_clean"], "eval_robust": ev["acc_robust"],
                          "kernel_written": os.path.exists(os.path.join(d, "k", f"saved_kernel_{s['kernel_n']}.pkl"))}
                # digits has 10 classes: far above chance means the pipeline trains and evaluates.
                ok = checks["kernel_written"] and min(checks["run_exp_phase2_clean"], checks["eval_clean"]) > s["min_acc"]
            except (OSError, KeyError, ValueError) as e:
                checks, ok = {"error": f"{type(e).__name__}: {e}"}, False
            rec.update(ok=ok, checks=checks, check=f"phase-2 and evaluation clean accuracy > {s['min_acc']} (chance 0.1)")

        self.run("smoke", cmds, parse_json=False, post=check)

    def stage_train(self, batch):
        c = self.conf
        self.run(f"train_{batch}", [self.py("bench/bench_train.py", "--model", c["model"], "--width", c["width"],
                                            "--batch_size", batch, "--pgd_batch_size", batch, "--repeats",
                                            c["train_repeats"], "--only", "train_standard,train_linear,pgd20")],
                 batch_size=batch)

    def stage_eval(self, linear):
        c = self.conf
        cmd = self.py("bench/gpu_check.py", "--eval_bench", "--model", c["model"], "--width", c["width"],
                      "--eval_images", c["eval_images"], "--eval_batch", c["eval_batch"], "--eval_steps", c["eval_steps"])
        self.run("eval_lin" if linear else "eval_std", [cmd + (["--linear"] if linear else [])])

    def stage_ntk(self):
        c = self.conf
        self.run("ntk", [self.py("bench/bench_ntk.py", "--model", c["model"], "--width", c["width"], "--engine_n",
                                 c["ntk_n"], "--baseline_n", "", "--repeats", "1", "--memory_gb", c["ntk_memory_gb"],
                                 "--class_index", "0")])

    # ----------------------------------------------------------------------------------
    def summary(self):
        def rec(stage, key, value):
            for r in self.results.get(stage, {}).get("records", []):
                if r.get(key) == value:
                    return r
            return None

        probe_rec = (self.results.get("probe", {}).get("records") or [{}])[0]
        peaks = {k: probe_rec.get(f"matmul_{k}_tflops") for k in ("bf16", "fp32_default", "fp32_highest")}
        train = {}
        for batch in self.conf["train_batches"]:
            for m in ("train_standard", "train_linear", "pgd20"):
                r = rec(f"train_{batch}", "measurement", m)
                if r is None:
                    continue
                entry = {"img_per_s": round(r["img_per_s"], 1), "s_per_step": round(r["median_s"], 5)}
                if r.get("achieved_gflops_per_s"):
                    tflops = r["achieved_gflops_per_s"] / 1e3
                    entry["achieved_tflops"] = round(tflops, 2)
                    for k, v in peaks.items():
                        if v:
                            entry[f"fraction_of_measured_{k}_peak"] = round(tflops / v, 4)
                    for k, v in DATASHEET_TFLOPS.items():
                        entry[f"fraction_of_datasheet_{k}"] = round(tflops / v, 4)
                train[f"{m}@{batch}"] = entry
        mem = [r.get("peak_gpu_mem_mib") for r in self.results.values() if r.get("peak_gpu_mem_mib")]
        out = {"stage": "summary", "mode": "cpu-smoke" if self.args.cpu_smoke else "gpu",
               "device_kind": probe_rec.get("device_kind"), "jax": probe_rec.get("jax"),
               "matmul_peaks_tflops": peaks, "datasheet_tflops_h200": DATASHEET_TFLOPS,
               "train_steps": train, "peak_gpu_mem_mib": max(mem) if mem else None,
               "stages_ok": {k: bool(v.get("ok")) for k, v in self.results.items()},
               "estimates": self.estimates(rec)}
        out["all_ok"] = all(out["stages_ok"].values()) and out["estimates"].get("complete", False)
        return self.emit(out)

    def estimates(self, rec):
        """Wall times of the reference README's examples 1-4 (CIFAR-10, ResNet-18, batch 128) on
        this card, from the measured steps at batch 128 and the PGD-100 evaluation rate."""
        b = self.conf["train_batches"][0]
        std, lin, pgd = (rec(f"train_{b}", "measurement", m) for m in ("train_standard", "train_linear", "pgd20"))
        ev_std = (self.results.get("eval_std", {}).get("records") or [None])[0]
        ev_lin = (self.results.get("eval_lin", {}).get("records") or [None])[0]
        if not (std and lin and pgd and ev_std):
            return {"complete": False, "missing": "needs train_{b}, eval_std (and eval_lin for 3-4)".format(b=b)}
        steps = math.ceil(CIFAR_TRAIN / 128)
        t_std, t_lin, t_pgd = std["median_s"], lin["median_s"], pgd["median_s"]
        per_img_std = ev_std["seconds"] / ev_std["images"] * 100 / ev_std["steps"]  # scaled to PGD-100
        lin_ratio = None
        if ev_lin:
            per_img_lin = ev_lin["seconds"] / ev_lin["images"] * 100 / ev_lin["steps"]
            lin_ratio = per_img_lin / per_img_std
        else:  # no linear evaluation measured: scale by the train steps' ratio
            per_img_lin = per_img_std * t_lin / t_std
        e_std = 2 * CIFAR_TEST * per_img_std  # run_exp evaluates L-inf and L2 PGD-100 on the test set
        e_lin = 2 * CIFAR_TEST * per_img_lin
        t_pgd_lin = t_pgd * (lin_ratio if lin_ratio else t_lin / t_std)
        ex = {
            "1": (101 * steps * t_std + e_std, "101 epochs x 391 phase-1 steps + L-inf and L2 PGD-100 on 10,000 test images"),
            "2": (101 * steps * (2 * t_std + t_pgd) + e_std,
                  "101 epochs x 391 x (2 phase-1 steps + PGD-20) + the evaluation"),
            "3": (e_std + 100 * steps * t_lin + e_lin,
                  "evaluation of the loaded model + 100 epochs x 391 linearized steps + linearized evaluation"),
            "4": (e_std + 100 * steps * (2 * t_lin + t_pgd_lin) + e_lin,
                  "as 3 with 2 linearized steps + PGD-20 on the linearized model per batch (PGD-20 scaled by "
                  "the linearized/standard PGD-100 evaluation ratio)"),
        }
        return {"complete": True, "inputs": {"s_per_phase1_step": t_std, "s_per_linear_step": t_lin,
                                             "s_per_pgd20_batch": t_pgd, "s_per_image_pgd100_std": per_img_std,
                                             "s_per_image_pgd100_lin": per_img_lin, "steps_per_epoch": steps,
                                             "measured_at_width": self.conf["width"], "model": self.conf["model"]},
                "examples": {k: {"hours": round(v / 3600, 3), "seconds": round(v, 1), "formula": f}
                             for k, (v, f) in ex.items()},
                "not_counted": "compilation (once per shape, seconds to a minute), checkpoint writes, data loading"}

    def main(self):
        a = self.args
        self.emit({"stage": "start", "mode": "cpu-smoke" if a.cpu_smoke else "gpu", "budget_s": a.budget_s,
                   "host": socket.gethostname(), "cpu": platform.processor(), "cores": os.cpu_count(),
                   "python": a.python, "loadavg_1min": os.getloadavg()[0], "wheels": os.environ.get("GPU_CHECK_WHEELS_INSTALLED")})
        try:
            self.stage_probe()
            self.stage_smoke()
            first, *rest = self.conf["train_batches"]
            self.stage_train(first)
            self.stage_eval(False)
            self.stage_eval(True)
            self.stage_ntk()
            for b in rest:
                self.stage_train(b)
            return self.summary()
        finally:
            self.poller.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                   help="tiny sizes on the CPU (checks this script; the figures mean nothing)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder of gpu_check.jsonl and gpu_check.log (default $OUT, else ./gpu_check_out)")
    p.add_argument("--work", default=None, help="scratch folder (default: a fresh temporary one)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="overall time budget in seconds (default 420 on a GPU, 240 with --cpu-smoke)")
    p.add_argument("--cap_scale", type=float, default=1.0,
                   help="multiply every stage's time cap (the overall budget still applies)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the stages")
    p.add_argument("--model", default=None, help="network of the timing stages (default resnet18; mlp_skinny with --cpu-smoke)")
    p.add_argument("--width", type=int, default=None, help="ResNet width of the timing stages (default 64; 4 with --cpu-smoke)")
    # helpers (run in subprocesses by the driver)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eval_bench", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--linear", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--matmul_n", type=int, default=8192, help=argparse.SUPPRESS)
    p.add_argument("--matmul_repeats", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--eval_images", type=int, default=1000, help=argparse.SUPPRESS)
    p.add_argument("--eval_batch", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--eval_steps", type=int, default=100, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    if args.eval_bench:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        args.model = args.model or "resnet18"
        args.width = args.width or 64
        return eval_bench(args)
    conf = dict(CPU_SMOKE if args.cpu_smoke else GPU)
    conf["model"] = args.model or conf["model"]
    conf["width"] = args.width or conf["width"]
    args.budget_s = args.budget_s or conf["budget_s"]
    own_work = args.work is None
    if own_work:
        import tempfile
        args.work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        summary = Driver(args, conf).main()
    finally:
        if own_work:
            shutil.rmtree(args.work, ignore_errors=True)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
