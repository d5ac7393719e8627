"""The empirical-NTK engine (ntk.py) against a reference-style baseline, on full-width ResNet-18.

One class logit, BatchNorm in inference mode, random weights and uniform-noise images (the cost
of a kernel does not depend on either). Every configuration runs in its own subprocess, so its
peak RSS is its own. Prints one JSON line per configuration: seconds (median of the timed runs
after a warm-up that compiles: one whole run for the engine, one block for the baseline), the engine's split into gradient passes and contractions,
and the process's peak RSS; then a summary line with the baseline extrapolated to the largest n
by block count, the speed-up, and the FLOP floor.

The baseline does what the reference did with neural-tangents: the kernel in 4x4 blocks of the
upper triangle, each block from scratch by vjp/jvp products (for each image j of the column block,
a vjp gives its parameter gradient and a jvp of the row block along it gives K[:, j]), so every
image's gradient is recomputed for every block it is in. Its time per block is the same for any
n, so n=500 is extrapolated from the measured blocks: 125*126/2 = 7875 blocks.

  PYTHONPATH=. python bench/bench_ntk.py                      # engine 32,100,500; baseline 32,100
  PYTHONPATH=. python bench/bench_ntk.py --engine_n 32 --baseline_n 32 --repeats 2   # quick look
"""
from __future__ import annotations

import argparse
import json
import shutil
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BLOCK = 4  # the reference's block size


def _setup(width, class_index, model="resnet18"):
    import jax.numpy as jnp

    import models
    import ntk
    from common import random_variables
    init, apply = models.get_model(model, 10, width)
    params, state = random_variables(init, (1, 32, 32, 3))
    f = ntk.NetFn(apply, state)

    def logit(p, x):  # the class logit as a scalar-per-image function [b]
        return f(p, x)[:, class_index]

    return f, logit, params, jnp


def baseline_block(logit, params):
    """One 4x4 block of the reference's schedule, from scratch: the column images' gradients by
    vjp products, then jvp products of the row images along them. Jitted once."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def block(xr, xc):
        _, pullback = jax.vjp(lambda p: logit(p, xc), params)
        grads = jax.vmap(lambda e: pullback(e)[0])(jnp.eye(len(xc)))  # [b, *params]: column gradients
        push = lambda g: jax.jvp(lambda p: logit(p, xr), (params,), (g,))[1]  # noqa: E731
        return jax.vmap(push, out_axes=1)(grads)  # [rows, cols]

    return block


def baseline_kernel(block, x):
    """The reference's schedule: 4x4 blocks of the upper triangle, each computed from scratch."""
    import numpy as np
    n = len(x)
    k = np.zeros((n, n))
    for i in range(0, n, BLOCK):
        for j in range(i, n, BLOCK):
            kb = np.asarray(block(x[i:i + BLOCK], x[j:j + BLOCK]))
            k[i:i + BLOCK, j:j + BLOCK] = kb
            k[j:j + BLOCK, i:i + BLOCK] = kb.T
    return k


def n_blocks(n):
    m = -(-n // BLOCK)
    return m * (m + 1) // 2


def child(args):
    """One configuration: warm-up run, then `repeats` timed runs; prints one JSON line."""
    import jax
    import numpy as np

    import ntk
    from common import machine
    f, logit, params, jnp = _setup(args.width, args.class_index, args.model)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(args.n, 32, 32, 3)).astype(np.float32))
    if args.side == "engine":
        def run():
            stats = {}
            k = ntk.empirical_ntk(f, params, x, class_index=args.class_index, memory_gb=args.memory_gb,
                                  stats=stats)
            return k, stats
    else:
        block = baseline_block(logit, params)

        def run():
            return baseline_kernel(block, x), {}
    t = time.time()
    if args.side == "engine":
        k, stats = run()  # warm-up: compiles
    else:  # every block has the same shapes: one block compiles the baseline
        jax.block_until_ready(block(x[:BLOCK], x[:BLOCK]))
    warm = time.time() - t
    times, all_stats = [], []
    for _ in range(args.repeats):
        t = time.time()
        k, stats = run()
        times.append(time.time() - t)
        all_stats.append(stats)
    line = {"bench": "ntk", "side": args.side, "n": args.n, "class_index": args.class_index,
            "model": args.model, "width": args.width, "repeats": args.repeats, "warmup_s": round(warm, 2),
            "seconds_median": round(statistics.median(times), 2), "seconds_all": [round(t, 2) for t in times],
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "symmetric_max_abs": float(np.abs(k - k.T).max()), "trace": float(np.trace(k)),
            "params": sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params)),
            "machine": machine(), "load_1min": os.getloadavg()[0]}
    if args.side == "engine":
        mid = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]
        s = all_stats[mid]
        line.update(memory_gb=args.memory_gb, chunk=s["chunk"], block=s["block"], panel_blocks=s["panel_blocks"],
                    panels=s["panels"], row_floats=s["row_floats"], example_gradients=s["example_gradients"],
                    gradient_s=round(s["gradient_seconds"], 2), contraction_s=round(s["contraction_seconds"], 2))
    else:
        line.update(blocks=n_blocks(args.n), seconds_per_block=round(statistics.median(times) / n_blocks(args.n), 4))
    if args.save_kernel:
        np.save(args.save_kernel, k)
    print(json.dumps(line), flush=True)


def matmul_gflops():
    """fp32 matmul throughput of this machine through XLA (median of 5 after a warm-up)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((2048, 2048), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.time()
        mm(a).block_until_ready()
        ts.append(time.time() - t)
    return 2 * 2048 ** 3 / statistics.median(ts) / 1e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine_n", default="32,100,500", help="comma-separated kernel sizes for the engine")
    p.add_argument("--baseline_n", default="32,100", help="comma-separated kernel sizes for the baseline")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (after one warm-up)")
    p.add_argument("--baseline_repeats", type=int, default=1,
                   help="timed runs per baseline configuration (n=100 takes about 4 min each)")
    p.add_argument("--memory_gb", type=float, default=None, help="engine budget (default: ntk.DEFAULT_MEMORY_GB)")
    p.add_argument("--class_index", type=int, default=0, help="class logit of the kernel")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = full)")
    p.add_argument("--model", default="resnet18",
                   help="network (models.NETWORKS); anything but resnet18 only for quick checks of this script")
    p.add_argument("--check", action="store_true",
                   help="also compare the engine's and the baseline's kernels at the smallest common n")
    # internal: one configuration in a subprocess
    p.add_argument("--side", choices=["engine", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save_kernel", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_gb is None:
        import ntk
        args.memory_gb = ntk.DEFAULT_MEMORY_GB
    return args


def spawn(args, side, n, repeats, save_kernel=None):
    """One configuration in a fresh process (so each has its own peak RSS); prints and returns its
    JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--n", str(n),
           "--repeats", str(repeats), "--memory_gb", str(args.memory_gb),
           "--class_index", str(args.class_index), "--width", str(args.width), "--model", args.model]
    if save_kernel:
        cmd += ["--save_kernel", save_kernel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench_ntk: the {side} n={n} child failed (exit {proc.returncode})")
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(line), flush=True)
    return line


def summarize(args, results, n_max, baseline_n):
    """The engine at the largest n against its floor (n example gradients + the full-Jacobian
    Gram at the measured matmul peak) and against the baseline extrapolated to n."""
    import ntk
    f, _, params, _ = _setup(args.width, args.class_index, args.model)
    gflops = matmul_gflops()
    floor_flop = ntk.flops_floor(params, n_max)
    summary = {"bench": "ntk_summary", "n": n_max, "matmul_gflops_measured": round(gflops, 1),
               "gram_tflop_full_jacobian_upper": round(floor_flop / 1e12, 2),
               "gram_tflop_full_jacobian_all_pairs": round(n_max ** 2 * 2 * ntk.flops_floor(params, 1) / 2 / 1e12, 2),
               "gram_floor_s_at_measured_peak": round(floor_flop / gflops / 1e9, 1)}
    engine = results.get(("engine", n_max))
    if engine:
        per_gradient = engine["gradient_s"] / engine["example_gradients"]
        floor = n_max * per_gradient + floor_flop / gflops / 1e9
        summary.update(engine_s=engine["seconds_median"], engine_gradient_s=engine["gradient_s"],
                       engine_contraction_s=engine["contraction_s"], engine_peak_rss_gb=engine["peak_rss_gb"],
                       seconds_per_example_gradient=round(per_gradient, 4),
                       floor_s=round(floor, 1),
                       floor="n example gradients at the engine's measured rate + the full-Jacobian Gram "
                             "(upper triangle) at the measured matmul peak",
                       engine_over_floor=round(engine["seconds_median"] / floor, 2))
    if baseline_n:
        per_block = min(results[("baseline", n)]["seconds_per_block"] for n in baseline_n)
        summary.update(baseline_s_per_block=per_block, baseline_blocks_at_n=n_blocks(n_max),
                       baseline_extrapolated_s=round(per_block * n_blocks(n_max), 1),
                       baseline_extrapolation="fastest measured seconds/block x blocks at n")
        if engine:
            summary["speedup_vs_extrapolated_baseline"] = round(per_block * n_blocks(n_max) / engine["seconds_median"], 1)
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.side:
        return child(args)

    import tempfile

    import numpy as np
    engine_n = [int(v) for v in args.engine_n.split(",") if v]
    baseline_n = [int(v) for v in args.baseline_n.split(",") if v]
    common = sorted(set(engine_n) & set(baseline_n))
    tmp = tempfile.mkdtemp(prefix="bench_ntk_")
    try:
        results = {}
        for side, sizes, repeats in (("engine", engine_n, args.repeats),
                                     ("baseline", baseline_n, args.baseline_repeats)):
            for n in sizes:
                keep = os.path.join(tmp, f"{side}.npy") if args.check and common and n == common[0] else None
                results[(side, n)] = spawn(args, side, n, repeats, keep)
        summary = summarize(args, results, max(engine_n), baseline_n)
        if args.check and common:
            ke, kb = (np.load(os.path.join(tmp, f"{s}.npy")) for s in ("engine", "baseline"))
            summary["check_n"] = common[0]
            summary["check_max_rel_diff"] = float(np.abs(ke - kb).max() / np.abs(kb).max())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
