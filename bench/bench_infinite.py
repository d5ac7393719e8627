"""infinite.py against neural-tangents 0.6.5, side by side in one run on one machine.

neural-tangents does not import under JAX 0.10, so its side runs in subprocesses of a Python with
its stack (`--nt_python`: JAX 0.4.23, neural-tangents 0.6.5); both sides build the same networks
(infinite.architecture and the same stax layers) and read the same CIFAR-10 images (`--data_dir`,
the torchvision pickles).

  accuracy  x1 = 6 training images, x2 = 4 others: NNGP and NTK of x1 x x2 and of x1 x x1
            (x2=None) for FC-1/2/5, FC-2 standard, Conv-2/4, Conv-2 standard, Myrtle-5 and Myrtle-5
            standard. One JSON line per case: max |a - nt64| / max |nt64| for each of the four
            kernels, a = ours float64, ours float32 and neural-tangents' own float32 (for
            comparison); targets 1e-5 (float64) and 1e-4 (float32).
  speed     NTK of n images against themselves (get='ntk', x2=None), float32, warm: FC-2 n=2000
            (neural-tangents unbatched, jitted: its fastest), Conv-4 n=500 (nt.batch 25),
            Myrtle-5 n=40 and Myrtle-10 n=20 (nt.batch 5). Every case and side runs in a fresh
            subprocess, so the peak RSS is per case. neural-tangents warms up at n = 2 x batch (all
            its batch shapes: nt.batch compiles per shape; unbatched: the same call), ours with the
            same call as the timed ones (its block shapes depend on n). One JSON line per case: both
            sides' median and all runs (wall and process CPU seconds), nt/ours, peak and pre-compute
            RSS, the 1-minute load average before each side's timed runs, the machine; for
            Myrtle, ours' arithmetic share: XLA's FLOP count of the call over its median, against
            the machine's float32 matmul peak measured in the same process.

`--write_expected PATH` also writes the fixed values tests/test_infinite.py embeds: neural-tangents'
float64 NNGP and NTK (x1 x x2) of the top-left 8x8 pixels of test_batch images 0-2 (x1) and 3-4
(x2), for FC-2, Conv-2, Myrtle-5 and FC-2 standard (width 50), with those pixels as uint8 lists.

  PYTHONPATH=. python bench/bench_infinite.py --nt_python /tmp/ntvenv/bin/python [--only accuracy|speed]
      [--repeats 3] [--nt_repeats 1] [--scale 0.1] [--cases conv4,myrtle5] [--write_expected PATH]

On a 2-core AMD EPYC the accuracy part takes about 3 minutes and the speed part about 25 with
`--repeats 3 --nt_repeats 1` (neural-tangents' Myrtle-5 at n=40 takes 9 minutes a call, Myrtle-10
at n=20 about 4); run it on an otherwise idle machine. `--scale` multiplies every speed case's n (a
smoke test); `--cases` picks speed cases.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from timing import time_calls  # noqa: E402  (standard library only: safe under neural-tangents' Python)

TARGETS = {"float64": 1e-5, "float32": 1e-4}
KERNELS = ("nngp_x1x2", "ntk_x1x2", "nngp_x1x1", "ntk_x1x1")


def _cfg(arch, depth, width=1000, W_std=2 ** 0.5, b_std=0.1, parameterization="ntk"):
    return {"arch": arch, "depth": depth, "width": width, "W_std": W_std, "b_std": b_std,
            "parameterization": parameterization}


ACCURACY_CASES = {
    "fc1": _cfg("fc", 1), "fc2": _cfg("fc", 2), "fc5": _cfg("fc", 5, W_std=1.3, b_std=0.3),
    "fc2_standard": _cfg("fc", 2, width=50, parameterization="standard"),
    "conv2": _cfg("conv", 2), "conv4": _cfg("conv", 4),
    "conv2_standard": _cfg("conv", 2, width=20, parameterization="standard"),
    "myrtle5": _cfg("myrtle", 5), "myrtle5_standard": _cfg("myrtle", 5, width=8, parameterization="standard"),
}
EXPECTED_CASES = ("fc2", "conv2", "myrtle5", "fc2_standard")
# name: (network, n, neural-tangents' batch size; 0 = unbatched, one jitted call)
SPEED_CASES = {"fc2": (_cfg("fc", 2), 2000, 0), "conv4": (_cfg("conv", 4), 500, 25),
               "myrtle5": (_cfg("myrtle", 5), 40, 5), "myrtle10": (_cfg("myrtle", 10), 20, 5)}
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


def load_cifar(data_dir, files, n):
    """The first n images of `files` (concatenated), uint8 NHWC."""
    import numpy as np
    out, have = [], 0
    for name in files:
        if have >= n:
            break
        with open(os.path.join(data_dir, name), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        out.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        have += len(out[-1])
    if have < n:
        raise SystemExit(f"error: {data_dir} holds {have} images in {', '.join(files)}, {n} needed")
    return np.concatenate(out)[:n]


# --------------------------------------------------------------------------------------
# The two sides' kernel functions
# --------------------------------------------------------------------------------------
def nt_kernel_fn(cfg):
    """Tsilivis & Kempe's builders in neural-tangents' stax (neural-tangents' Python only)."""
    from neural_tangents import stax
    kw = dict(W_std=cfg["W_std"], b_std=cfg["b_std"], parameterization=cfg["parameterization"])
    w, depth = cfg["width"], cfg["depth"]
    conv = [stax.Conv(w, (3, 3), padding="SAME", **kw), stax.Relu()]
    if cfg["arch"] == "fc":
        layers = [stax.Flatten()] + [stax.Dense(w, **kw), stax.Relu()] * depth
    elif cfg["arch"] == "conv":
        layers = conv * depth + [stax.Flatten()]
    else:
        *stages, last = {5: [1, 1, 1], 7: [1, 2, 2], 10: [2, 3, 3]}[depth]
        layers = list(conv)
        for k in stages:
            layers += conv * k + [stax.AvgPool((2, 2), strides=(2, 2))]
        layers += conv * last + [stax.GlobalAvgPool()]
    return stax.serial(*layers, stax.Dense(1, **kw))[2]


def our_kernel_fn(cfg):
    import infinite
    return infinite.architecture(cfg["arch"], cfg["depth"], width=cfg["width"], W_std=cfg["W_std"],
                                 b_std=cfg["b_std"], parameterization=cfg["parameterization"])[2]


def four_kernels(kfn, x1, x2, **kw):
    """{KERNELS[i]: float64 array}: NNGP and NTK of x1 x x2 and of x1 x x1 (x2=None)."""
    import numpy as np
    a, b = kfn(x1, x2, ("nngp", "ntk"), **kw), kfn(x1, None, ("nngp", "ntk"), **kw)
    return dict(zip(KERNELS, (np.asarray(k, np.float64) for k in (a.nngp, a.ntk, b.nngp, b.ntk))))


def _answer_stream():
    """The real stdout for the answer; anything else printed goes to stderr."""
    answer = sys.stdout
    sys.stdout = sys.stderr
    return answer


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def nt_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(PYTHONNOUSERSITE="1", TF_CPP_MIN_LOG_LEVEL="3")  # neural-tangents imports TensorFlow
    return env


def our_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def run_worker(python, env, job, script=os.path.abspath(__file__)):
    """Run `script` (this one by default) as a worker under `python` with the JSON `job`; returns
    its JSON answer."""
    proc = subprocess.run([python, script, "--worker", json.dumps(job)], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: worker {job['kind']} under {python} exited with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Workers (a subprocess each)
# --------------------------------------------------------------------------------------
def worker_nt_kernels(job):
    """neural-tangents' four kernels of every case in job['cases'] on the inputs' x1, x2."""
    import jax
    jax.config.update("jax_enable_x64", job["x64"])
    import numpy as np
    dtype = np.float64 if job["x64"] else np.float32
    z = np.load(job["inputs"])
    x1, x2 = z["x1"].astype(dtype), z["x2"].astype(dtype)
    out = {}
    for name, cfg in job["cases"].items():
        for k, v in four_kernels(nt_kernel_fn(cfg), x1, x2).items():
            out[f"{name}/{k}"] = v
    np.savez(job["out"], **out)
    import neural_tangents
    return {"jax": jax.__version__, "neural_tangents": neural_tangents.__version__}


def worker_speed(job):
    """Warm up, then time job['repeats'] calls of the NTK of n images against themselves."""
    import jax
    import numpy as np
    x = (load_cifar(job["data_dir"], TRAIN_FILES, job["n"]) / 255).astype(np.float32)
    if job["side"] == "nt":
        import neural_tangents as nt
        kfn = nt.batch(nt_kernel_fn(job["cfg"]), batch_size=job["batch"], store_on_device=False)
        warm_x = x[:job["warm_n"]]
    else:
        kfn, warm_x = our_kernel_fn(job["cfg"]), x
    stats = {}   # ours: the last call's block plan
    extra = {} if job["side"] == "nt" else {"stats": stats}
    call = lambda xs: np.asarray(kfn(xs, None, "ntk", **extra))  # noqa: E731
    rss_before = _rss_mb()
    t = time.perf_counter()
    call(warm_x)
    warmup_s = time.perf_counter() - t
    load = os.getloadavg()[0]
    walls, cpus = time_calls(lambda: call(x), job["repeats"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"walls": walls, "cpus": cpus, "warmup_s": round(warmup_s, 2), "warm_n": len(warm_x),
           "loadavg_1min": round(load, 2), "rss_before_compute_mb": round(rss_before), "peak_rss_mb": round(peak),
           "jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
    if job["side"] == "ours" and job["cfg"]["arch"] == "myrtle":
        out.update(arithmetic_share(kfn, x, stats, statistics.median(walls)))
    return out


def xla_flops(kfn, x, stats):
    """XLA's FLOP count (cost analysis: 2 per multiply-add, 1 per elementwise op) of one
    kernel_fn(x, None) call: the per-image program on all of x plus the per-block program, at the
    block shape that call reported in `stats`, times its number of blocks."""
    import jax
    import infinite
    import numpy as np
    (b1, b2), blocks = stats["block"], stats["blocks"]
    var_fn, pair_fn = infinite._jitted(kfn.ops, x.shape[1:])
    spec = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    qs = jax.eval_shape(var_fn, spec(b1, *x.shape[1:]))
    q2 = [spec(b2, *q.shape[1:]) for q in qs]
    with jax.default_matmul_precision("highest"):
        var_cost = var_fn.lower(spec(len(x), *x.shape[1:])).compile().cost_analysis()
        pair_cost = pair_fn.lower(spec(b1, *x.shape[1:]), spec(b2, *x.shape[1:]), list(qs), q2,
                                  spec(b1, b2, dtype=np.bool_)).compile().cost_analysis()
    return var_cost["flops"] + blocks * pair_cost["flops"]


def matmul_peak(n=4096, repeats=5):
    """The machine's measured float32 peak: FLOP/s of an n x n matmul, median after a warm-up."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    walls, _ = time_calls(lambda: f(a).block_until_ready(), repeats)
    return 2 * n ** 3 / statistics.median(walls)


SHARE_KEYS = ("xla_flops", "achieved_gflops", "matmul_peak_gflops", "arithmetic_share")


def arithmetic_share(kfn, x, stats, seconds):
    flops, peak = xla_flops(kfn, x, stats), matmul_peak()
    return dict(zip(SHARE_KEYS, (flops, round(flops / seconds / 1e9, 2), round(peak / 1e9, 1),
                                 round(flops / seconds / peak, 3))))


WORKERS = {"nt_kernels": worker_nt_kernels, "speed": worker_speed}


# --------------------------------------------------------------------------------------
# The two measurements
# --------------------------------------------------------------------------------------
def _rel(a, ref):
    import numpy as np
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def nt_kernels(args, tmp, cases, x1, x2, x64):
    """{case: {kernel: array}} from neural-tangents, plus its versions."""
    import numpy as np
    inputs, out = os.path.join(tmp, "inputs.npz"), os.path.join(tmp, f"nt_{int(x64)}.npz")
    np.savez(inputs, x1=x1, x2=x2)
    versions = run_worker(args.nt_python, nt_env(), {"kind": "nt_kernels", "x64": x64, "inputs": inputs, "out": out,
                                                     "cases": {c: ACCURACY_CASES[c] for c in cases}})
    z = np.load(out)
    return {c: {k: z[f"{c}/{k}"] for k in KERNELS} for c in cases}, versions


def accuracy(args, tmp, mach):
    images = load_cifar(args.data_dir, ["data_batch_1"], 10) / 255
    x1, x2 = images[:6], images[6:]
    cases = list(ACCURACY_CASES)
    nt64, versions = nt_kernels(args, tmp, cases, x1, x2, True)
    nt32, _ = nt_kernels(args, tmp, cases, x1, x2, False)
    for c in cases:
        kfn = our_kernel_fn(ACCURACY_CASES[c])
        ours = {dt: four_kernels(kfn, x1, x2, dtype=dt) for dt in TARGETS}
        err = {side: {k: _rel(v[k], nt64[c][k]) for k in KERNELS}
               for side, v in (("ours_f64", ours["float64"]), ("ours_f32", ours["float32"]), ("nt_f32", nt32[c]))}
        print(json.dumps({
            "bench": "infinite_accuracy", "case": c, "config": ACCURACY_CASES[c], "n1": len(x1), "n2": len(x2),
            "data": "CIFAR-10 data_batch_1 images 0-5 (x1), 6-9 (x2)",
            "max_rel_err_vs_nt_f64": err, "targets": TARGETS,
            "within_targets": max(err["ours_f64"].values()) <= TARGETS["float64"]
            and max(err["ours_f32"].values()) <= TARGETS["float32"],
            "nt_stack": versions, "machine": mach}), flush=True)


def write_expected(args, tmp, path):
    pixels = load_cifar(args.data_dir, ["test_batch"], 5)[:, :8, :8, :]
    x = pixels / 255
    nt64, versions = nt_kernels(args, tmp, EXPECTED_CASES, x[:3], x[3:], True)
    cases, errs = [], {}
    for c in EXPECTED_CASES:
        cases.append(dict(ACCURACY_CASES[c], nngp=nt64[c]["nngp_x1x2"].tolist(), ntk=nt64[c]["ntk_x1x2"].tolist()))
        ours = four_kernels(our_kernel_fn(ACCURACY_CASES[c]), x[:3], x[3:], dtype="float64")
        errs[c] = max(_rel(ours[k], nt64[c][k]) for k in ("nngp_x1x2", "ntk_x1x2"))
    with open(path, "w") as f:
        json.dump({"source": "neural-tangents float64 (bench/bench_infinite.py --write_expected), "
                             "x1 = pixels[:3] / 255, x2 = pixels[3:] / 255; pixels = CIFAR-10 test_batch "
                             "images 0-4, top-left 8x8, HWC",
                   "nt_stack": versions, "pixels": pixels.tolist(), "cases": cases}, f)
    print(json.dumps({"bench": "infinite_expected", "path": path, "ours_f64_max_rel_err": errs}), flush=True)


def speed(args, mach):
    for c in args.cases or list(SPEED_CASES):
        cfg, n, batch = SPEED_CASES[c]
        if batch:   # a multiple of the batch, at least two batches
            n = max(2, round(n * args.scale / batch)) * batch
        else:
            n = max(2, round(n * args.scale))
        nt_repeats = args.nt_repeats if cfg["arch"] == "myrtle" else args.repeats
        job = {"kind": "speed", "cfg": cfg, "n": n, "batch": batch, "data_dir": args.data_dir}
        res = {"ours": run_worker(sys.executable, our_env(), dict(job, side="ours", repeats=args.repeats)),
               "nt": run_worker(args.nt_python, nt_env(), dict(job, side="nt", repeats=nt_repeats,
                                                               warm_n=2 * batch if batch else n))}
        med = {s: statistics.median(r["walls"]) for s, r in res.items()}
        print(json.dumps({
            "bench": "infinite_speed", "case": c, "config": cfg, "n": n, "get": "ntk", "x2": None, "dtype": "float32",
            "nt_batching": f"nt.batch(batch_size={batch}, store_on_device=False)" if batch
            else "unbatched (nt.batch(batch_size=0): one jitted call)",
            "ours_s": round(med["ours"], 3), "nt_s": round(med["nt"], 3),
            "ratio_nt_over_ours": round(med["nt"] / med["ours"], 2),
            **{f"{s}_{k}": ([round(v, 3) for v in r[k]] if isinstance(r[k], list) else r[k])
               for s, r in res.items() for k in ("walls", "cpus", "warmup_s", "warm_n", "peak_rss_mb",
                                                 "rss_before_compute_mb", "loadavg_1min")},
            **{f"{s}_{k}": r[k] for s, r in res.items() for k in ("jax", "device")},
            **{k: v for k, v in res["ours"].items() if k in SHARE_KEYS}, "machine": mach}), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nt_python", help="Python with neural-tangents 0.6.5 (JAX 0.4.23)")
    p.add_argument("--data_dir", default=os.path.join("..", "shared", "data", "cifar-10-batches-py"),
                   help="CIFAR-10 python pickles (data_batch_1..5, test_batch)")
    p.add_argument("--only", choices=("accuracy", "speed"), help="one of the two measurements (default both)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side and speed case")
    p.add_argument("--nt_repeats", type=int, default=1, help="timed calls of neural-tangents' Myrtle cases")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every speed case's n (a smoke test)")
    p.add_argument("--cases", type=lambda s: [c for c in s.split(",") if c],
                   help=f"comma-separated subset of the speed cases {','.join(SPEED_CASES)}")
    p.add_argument("--write_expected", metavar="PATH", help="also write the fixed values of tests/test_infinite.py")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and not args.nt_python:
        p.error("--nt_python is required")
    if args.cases and set(args.cases) - set(SPEED_CASES):
        p.error(f"unknown --cases {', '.join(sorted(set(args.cases) - set(SPEED_CASES)))}")
    args.data_dir = os.path.abspath(args.data_dir)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        answer = _answer_stream()
        job = json.loads(args.worker)
        answer.write(json.dumps(WORKERS[job["kind"]](job)) + "\n")
        return
    sys.path.insert(0, ROOT)
    from common import machine
    mach = machine()
    with tempfile.TemporaryDirectory(prefix="bench_infinite_") as tmp:
        if args.write_expected:
            write_expected(args, tmp, args.write_expected)
        if args.only in (None, "accuracy"):
            accuracy(args, tmp, mach)
    if args.only in (None, "speed"):
        speed(args, mach)


if __name__ == "__main__":
    main()
