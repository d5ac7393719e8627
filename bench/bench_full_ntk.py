"""The full empirical NTK (every class pair) of Tsilivis & Kempe's CNN_mega: ours
(`ntk.empirical_ntk(..., full=True)`) against neural-tangents 0.6.5's
`empirical_ntk_fn(f, trace_axes=(), vmap_axes=0)`, side by side in one run on one machine.

Both sides take the same weights (ours: `models.get_model('cnn_mega', 10, width)` initialised with
`--seed`, handed to neural-tangents' side as arrays) and the same first n CIFAR-10 training images
(pixels / 255, as T&K). neural-tangents' side runs in a subprocess of `--nt_python` (JAX 0.4.23,
neural-tangents 0.6.5) and applies the weights with its own plain-JAX CNN_mega written from T&K's
description (lax convolutions and pools), so the logits check our Haiku model too.

  accuracy  n = --n_accuracy images: max |a - nt64| / max |nt64| over the [n, n, 10, 10] kernel,
            a = ours (float32 arithmetic) and neural-tangents' own float32 (for comparison), nt64
            = neural-tangents with jax_enable_x64; also the logits' largest difference.
  speed     n = --n_speed images (T&K's batch is 250): each side's full kernel, warm, float32:
            ours and neural-tangents' jacobian contraction (its default, T&K's call) and its
            structured derivatives. One JSON line: the medians and all runs, nt/ours, the 1-minute
            load average before each side's timed runs, the machine.

  PYTHONPATH=. python bench/bench_full_ntk.py --nt_python /tmp/ntvenv/bin/python --data_dir DIR
      [--n_accuracy 20] [--n_speed 100] [--repeats 3] [--width 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_infinite import _answer_stream, load_cifar, nt_env, our_env, run_worker  # noqa: E402  (stdlib only)
from timing import time_calls  # noqa: E402

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def _load(job):
    import numpy as np
    z = np.load(job["inputs"])
    x = z["x"].astype(np.float32) / 255.0
    weights = [(z[f"w{i}"], z[f"b{i}"]) for i in range(int(z["layers"]))]
    return x, weights


def worker_ours(job):
    """Our side: the weights and images written for neural-tangents' side (job['write']), then the
    kernel (`_compute`)."""
    import jax
    import numpy as np

    import models
    import ntk
    pixels = load_cifar(job["data_dir"], TRAIN_FILES, job["n"])
    x = pixels.astype(np.float32) / 255.0
    init, apply = models.get_model("cnn_mega", 10, job["width"])
    params, state = init(jax.random.PRNGKey(job["seed"]), x[:1], True)
    f = ntk.NetFn(apply, state)
    if job.get("write"):
        order = sorted(params, key=lambda m: (m.split("/")[-1].startswith("linear"),
                                              int(m.rsplit("_", 1)[1]) if m[-1].isdigit() else 0))
        arrays = {"x": pixels, "layers": len(order)}
        for i, m in enumerate(order):
            arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(params[m]["w"]), np.asarray(params[m]["b"])
        np.savez(job["write"], **arrays)
    return _compute(job, lambda: ntk.empirical_ntk(f, params, x, full=True), lambda: f(params, x), jax.__version__)


def _compute(job, kernel, logits, version):
    """The kernel once (the warm-up: every shape compiled), written with the logits where the job
    says, then `repeats` timed calls."""
    import numpy as np
    k = kernel()
    if job.get("out"):
        np.save(job["out"] + "_kernel.npy", np.asarray(k))
        np.save(job["out"] + "_logits.npy", np.asarray(logits()))
    load = os.getloadavg()[0]
    walls, cpus = time_calls(kernel, job.get("repeats", 0))
    return {"walls": walls, "cpus": cpus, "loadavg_1min": load, "jax": version}


def _nt_apply(weights):
    """CNN_mega from T&K's description, plain JAX: Conv Conv MaxPool Conv Conv Conv Conv AvgPool
    Dense, 3x3 SAME convolutions with bias and ReLU, 2x2 stride-2 pools, NHWC / HWIO."""
    import jax
    import jax.numpy as jnp

    def pool(x, op, init):
        return jax.lax.reduce_window(x, init, op, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def apply(params, x):
        for i, (w, b) in enumerate(params[:-1]):
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + b)
            if i == 1:
                x = pool(x, jax.lax.max, -jnp.inf)
        x = pool(x, jax.lax.add, 0.0) / 4.0
        w, b = params[-1]
        return x.reshape(x.shape[0], -1) @ w + b
    return apply


def worker_nt(job):
    """neural-tangents' side (its own Python): the full kernel, timed or written."""
    import jax
    if job.get("x64"):
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt
    import numpy as np
    x, weights = _load(job)
    dtype = jnp.float64 if job.get("x64") else jnp.float32
    params = [(jnp.asarray(w, dtype), jnp.asarray(b, dtype)) for w, b in weights]
    x = jnp.asarray(x, dtype)
    apply = _nt_apply(weights)
    impl = nt.NtkImplementation[job["implementation"]]
    kfn = jax.jit(nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0, implementation=impl))
    return _compute(job, lambda: np.asarray(kfn(x, None, params)), lambda: apply(params, x), jax.__version__)


WORKERS = {"ours": worker_ours, "nt": worker_nt}
SCRIPT = os.path.abspath(__file__)


def _rel(a, ref):
    import numpy as np
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _result(tmp, name):
    import numpy as np
    return np.load(f"{tmp}/{name}_kernel.npy"), np.load(f"{tmp}/{name}_logits.npy")


def accuracy(args, tmp, mach):
    """Ours and neural-tangents' float32 against neural-tangents' float64 (its float64 convolution
    gradients are slow on XLA:CPU: about 35 s for n = 4 on 2 cores, so n stays small)."""
    import numpy as np
    n, inputs = args.n_accuracy, os.path.join(tmp, "inputs_accuracy.npz")
    run_worker(sys.executable, our_env(), {"kind": "ours", "data_dir": args.data_dir, "n": n, "width": args.width,
                                           "seed": args.seed, "write": inputs, "out": f"{tmp}/ours"}, script=SCRIPT)
    for name, x64 in (("nt64", True), ("nt32", False)):
        run_worker(args.nt_python, nt_env(), {"kind": "nt", "inputs": inputs, "x64": x64, "out": f"{tmp}/{name}",
                                              "implementation": "JACOBIAN_CONTRACTION"}, script=SCRIPT)
    (k, lg), (k64, lg64), (k32, _) = (_result(tmp, s) for s in ("ours", "nt64", "nt32"))
    print(json.dumps({"bench": "full_ntk_accuracy", "model": "cnn_mega", "width": args.width, "n": n,
                      "shape": list(k64.shape), "ours_f32_vs_nt64": _rel(k, k64), "nt_f32_vs_nt64": _rel(k32, k64),
                      "logits_max_abs_diff": float(np.max(np.abs(lg - lg64))), "machine": mach}), flush=True)


def speed(args, tmp, mach):
    """Each side's full kernel of n images, float32, warm; neural-tangents' kernels also compared
    with ours."""
    import statistics
    n, inputs = args.n_speed, os.path.join(tmp, "inputs_speed.npz")
    ours = run_worker(sys.executable, our_env(), {"kind": "ours", "data_dir": args.data_dir, "n": n,
                                                  "width": args.width, "seed": args.seed, "write": inputs,
                                                  "out": f"{tmp}/ours_speed", "repeats": args.repeats}, script=SCRIPT)
    median = lambda r: round(statistics.median(r["walls"]), 3)  # noqa: E731
    k = _result(tmp, "ours_speed")[0]
    line = {"bench": "full_ntk_speed", "model": "cnn_mega", "width": args.width, "n": n, "dtype": "float32",
            "ours_s": median(ours), "ours_walls": [round(w, 3) for w in ours["walls"]],
            "ours_loadavg_1min": ours["loadavg_1min"], "ours_jax": ours["jax"]}
    for impl in args.implementations:
        key = impl.lower()
        nt = run_worker(args.nt_python, nt_env(), {"kind": "nt", "inputs": inputs, "implementation": impl,
                                                   "out": f"{tmp}/{key}", "repeats": args.repeats}, script=SCRIPT)
        line.update({f"nt_{key}_s": median(nt), f"nt_{key}_walls": [round(w, 3) for w in nt["walls"]],
                     f"ratio_nt_{key}_over_ours": round(median(nt) / median(ours), 2),
                     f"nt_{key}_vs_ours_max_rel": _rel(_result(tmp, key)[0], k),
                     f"nt_{key}_loadavg_1min": nt["loadavg_1min"], "nt_jax": nt["jax"]})
    line["machine"] = mach
    print(json.dumps(line), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nt_python", help="Python with neural-tangents 0.6.5 (JAX 0.4.23)")
    p.add_argument("--data_dir", default=os.path.join("..", "shared", "data", "cifar-10-batches-py"),
                   help="CIFAR-10 python pickles (data_batch_1..5)")
    p.add_argument("--only", choices=("accuracy", "speed"), help="one of the two measurements (default both)")
    p.add_argument("--n_accuracy", type=int, default=4, help="images of the float64 accuracy check")
    p.add_argument("--n_speed", type=int, default=100, help="images of the speed check (T&K: 250)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    p.add_argument("--width", type=int, default=32, help="CNN_mega's first conv channels (T&K: 32)")
    p.add_argument("--seed", type=int, default=0, help="initialization seed")
    p.add_argument("--implementations", type=lambda s: s.split(","),
                   default=["JACOBIAN_CONTRACTION", "STRUCTURED_DERIVATIVES"],
                   help="neural-tangents' NtkImplementation names timed, comma-separated")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and not args.nt_python:
        p.error("--nt_python is required")
    args.data_dir = os.path.abspath(args.data_dir)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        answer = _answer_stream()
        job = json.loads(args.worker)
        answer.write(json.dumps(WORKERS[job["kind"]](job)) + "\n")
        return
    from common import machine
    mach = machine()
    with tempfile.TemporaryDirectory(prefix="bench_full_ntk_") as tmp:
        if args.only in (None, "accuracy"):
            accuracy(args, tmp, mach)
        if args.only in (None, "speed"):
            speed(args, tmp, mach)


if __name__ == "__main__":
    main()
