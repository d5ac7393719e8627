"""Cost of APGD-CE against PGD with the same number of steps, on the full-width ResNet-18.

Prints one JSON line per measurement: the machine, the configuration, the median wall time of
`--repeats` runs after one warm-up run (compilation excluded), and the median per step; then
one line with the APGD-CE / PGD ratio. Runs of the two attacks are interleaved, so load from
other processes hits both sides alike.

  PYTHONPATH=. python bench/bench_attacks.py --steps 10 --repeats 5        # CPU: time 10 steps
  PYTHONPATH=. python bench/bench_attacks.py --loops fori,host              # the two loop modes
  PYTHONPATH=. python bench/bench_attacks.py --steps 100 --repeats 10      # GPU: the full budget

The network has random weights (a non-zero logits layer, BatchNorm in inference mode) and the
images are uniform noise: the cost of an attack step does not depend on either.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, random_variables  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="attack steps per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per attack (after one warm-up)")
    p.add_argument("--batch_size", type=int, default=100, help="images per batch")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = full)")
    p.add_argument("--dynamics", default="standard", help="dynamics attacked (models.DYNAMICS)")
    p.add_argument("--attacks", default="pgd,apgd-ce", help="comma-separated: pgd, apgd-ce, apgd-dlr (one target)")
    p.add_argument("--loops", default="auto",
                   help="comma-separated loop modes to time (NTK_ATTACK_LOOP: auto, fori, host); 'fori,host' "
                        "also prints their ratio")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import attacks
    import models

    init, apply = models.get_model("resnet18", 10, args.width)
    shape = (args.batch_size, 32, 32, 3)
    params, state = random_variables(init, shape)
    predict = attacks.make_predict(apply, args.dynamics)
    theta0 = params
    if args.dynamics != "standard":
        theta0 = jax.tree_util.tree_map(lambda a: a * 0.9, params)
    variables = (params, theta0, state)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, args.batch_size).astype(np.int32))
    eps = 4 / 255
    key = jax.random.PRNGKey(0)

    runners = {
        "pgd": lambda: attacks.pgd(predict, variables, x, y, key, eps, 2 * eps / args.steps,
                                   steps=args.steps, norm="linf"),
        "apgd-ce": lambda: attacks.apgd(predict, variables, x, y, key, eps, steps=args.steps,
                                        norm="linf", loss="ce"),
        "apgd-dlr": lambda: attacks.apgd(predict, variables, x, y, key, eps, steps=args.steps,
                                         norm="linf", loss="dlr-t", target_rank=0),
    }
    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    for n in names:
        if n not in runners:
            p.error(f"unknown attack {n!r}")
    loops = [m.strip() for m in args.loops.split(",") if m.strip()]
    cases = [(n, m) for m in loops for n in names]

    def run(case):
        os.environ["NTK_ATTACK_LOOP"] = case[1]
        runners[case[0]]().block_until_ready()

    info = machine()
    compile_s = {}
    for c in cases:   # warm-up: compile and run once
        t = time.perf_counter()
        run(c)
        compile_s[c] = time.perf_counter() - t
    times = {c: [] for c in cases}
    for _ in range(args.repeats):
        for c in cases:   # interleaved
            t = time.perf_counter()
            run(c)
            times[c].append(time.perf_counter() - t)
    config = {"model": "resnet18", "width": args.width, "batch_size": args.batch_size, "steps": args.steps,
              "norm": "linf", "dynamics": args.dynamics, "repeats": args.repeats}
    med = {c: statistics.median(t) for c, t in times.items()}
    for (n, m) in cases:
        os.environ["NTK_ATTACK_LOOP"] = m
        print(json.dumps({"bench": "attack_cost", "attack": n, "loop": m, "loop_used": attacks.loop_mode(),
                          **config, "machine": info,
                          "median_s": round(med[n, m], 4), "median_s_per_step": round(med[n, m] / args.steps, 5),
                          "min_s": round(min(times[n, m]), 4), "max_s": round(max(times[n, m]), 4),
                          "warmup_s_with_compile": round(compile_s[n, m], 2)}), flush=True)
    for m in loops:
        if "pgd" in names and "apgd-ce" in names:
            print(json.dumps({"bench": "apgd_ce_over_pgd", "loop": m, **config, "machine": info,
                              "ratio_of_medians": round(med["apgd-ce", m] / med["pgd", m], 3)}), flush=True)
    if "fori" in loops and "host" in loops:
        for n in names:
            print(json.dumps({"bench": "fori_over_host", "attack": n, **config, "machine": info,
                              "ratio_of_medians": round(med[n, "fori"] / med[n, "host"], 3)}), flush=True)


if __name__ == "__main__":
    main()
