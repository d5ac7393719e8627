"""Cost of the evaluation attacks: per step, and per image at AutoAttack's full budgets.

Prints one JSON line per measurement: the machine (with the 1-minute load average at start), the
configuration, the median wall time of `--repeats` runs after one warm-up run (compilation
excluded), the median per step (a call's time over its steps, so the attack's initial query is
spread over them) and the median process CPU time per step (all threads: steadier than wall time
on a machine shared with other jobs); then:
- 'apgd_ce_over_pgd': the APGD-CE / PGD ratio per step;
- 'attack_full_budget' (with --budget): per attack, the cost per image of its AutoAttack budget
  (PGD-100 and APGD-CE: 100 steps; APGD-T and FAB-T: 100 steps for each of min(9, classes - 1)
  targets; Square: 5000 queries), EXTRAPOLATED: every attack is also timed with 2 x `--steps`
  steps, the difference gives the marginal cost of a step and the rest the set-up (clean pass,
  first query), and the budget costs set-up + steps x step; 'over_pgd100' divides by PGD-100's;
- 'ensemble_full_budget' (with --budget and all four members): AutoAttack's standard ensemble
  as a sum of its members. That is its cost where every image survives to Square (a fully
  robust model, no early stops); members after APGD-CE only attack the images still robust, so on
  a model with robust accuracy r after APGD-CE the last three cost about r times their figure.
Runs of the attacks are interleaved, so load from other processes hits them alike.

  PYTHONPATH=. python bench/bench_attacks.py --steps 10 --repeats 5        # CPU: time 10 steps
  PYTHONPATH=. python bench/bench_attacks.py --loops fori,host              # the two loop modes
  PYTHONPATH=. python bench/bench_attacks.py --attacks pgd,apgd-ce,apgd-dlr,fab-t,square --budget \\
      --steps 5 --repeats 3 --batch_size 20                                 # AutoAttack's members
  PYTHONPATH=. python bench/bench_attacks.py --model mlp_skinny --dataset digits --attacks \\
      pgd,apgd-ce,apgd-dlr,fab-t,square --budget                            # a digits network

The network has random weights (a non-zero logits layer, BatchNorm in inference mode) and the
images are uniform noise, labelled with the network's own predictions (so every image starts
correctly classified and Square never stops early): the cost of an attack step does not depend
on either.
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

BUDGET_STEPS = {"pgd": 100, "apgd-ce": 100, "apgd-dlr": 100, "fab-t": 100, "square": 5000}   # AutoAttack's
TARGETED = ("apgd-dlr", "fab-t")
ENSEMBLE = ("apgd-ce", "apgd-dlr", "fab-t", "square")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="attack steps (Square: queries) per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per attack (after one warm-up)")
    p.add_argument("--batch_size", type=int, default=100, help="images per batch")
    p.add_argument("--model", default="resnet18", help="models.NETWORKS")
    p.add_argument("--dataset", default="cifar10", help="input shape and classes: cifar10 or digits")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = full)")
    p.add_argument("--dynamics", default="standard", help="dynamics attacked (models.DYNAMICS)")
    p.add_argument("--attacks", default="pgd,apgd-ce",
                   help="comma-separated: pgd, apgd-ce, apgd-dlr (one target), fab-t (one target), square")
    p.add_argument("--budget", action="store_true",
                   help="also print each attack's (and the ensemble's) extrapolated cost per image at "
                        "AutoAttack's budgets")
    p.add_argument("--loops", default="auto",
                   help="comma-separated loop modes to time (NTK_ATTACK_LOOP: auto, fori, host); 'fori,host' "
                        "also prints their ratio")
    args = p.parse_args(argv)
    args.names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    for n in args.names:
        if n not in BUDGET_STEPS:
            p.error(f"unknown attack {n!r}")
    args.loop_modes = [m.strip() for m in args.loops.split(",") if m.strip()]
    return args


def make_runner(args):
    """`runner(attack name, steps)`: one attack of a random network on noise images labelled with
    its own predictions."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import attacks
    import autoattack
    import data
    import models

    init, apply = models.get_model(args.model, data.num_classes_of(args.dataset), args.width)
    shape = (args.batch_size,) + tuple(data.INPUT_SHAPES[args.dataset])
    params, state = random_variables(init, shape)
    predict = attacks.make_predict(apply, args.dynamics)
    theta0 = params if args.dynamics == "standard" else jax.tree_util.tree_map(lambda a: a * 0.9, params)
    variables = (params, theta0, state)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=shape).astype(np.float32))
    y = jnp.argmax(predict(variables, x), -1).astype(jnp.int32)
    eps = 4 / 255
    key = jax.random.PRNGKey(0)

    def runner(name, steps):
        if name == "pgd":
            return attacks.pgd(predict, variables, x, y, key, eps, 2 * eps / steps, steps=steps, norm="linf")
        if name in ("apgd-ce", "apgd-dlr"):
            return autoattack.apgd(predict, variables, x, y, key, eps, steps=steps, norm="linf",
                                   loss="ce" if name == "apgd-ce" else "dlr-t", target_rank=0)
        if name == "fab-t":
            return autoattack.fab_t(predict, variables, x, y, key, eps, steps=steps, norm="linf")
        return jnp.asarray(autoattack.square(predict, variables, x, y, key, eps, queries=steps, norm="linf"))
    return runner


def time_cases(args, runner, cases):
    """Warm-up (compile) each (attack, loop mode, steps) case, then `--repeats` interleaved rounds.
    Returns (warm-up seconds, wall seconds lists, process-CPU seconds lists), keyed by case."""
    def run(case):
        os.environ["NTK_ATTACK_LOOP"] = case[1]
        runner(case[0], case[2]).block_until_ready()

    compile_s = {}
    for c in cases:
        t = time.perf_counter()
        run(c)
        compile_s[c] = time.perf_counter() - t
    times, cpu = {c: [] for c in cases}, {c: [] for c in cases}
    for _ in range(args.repeats):
        for c in cases:
            t, t_cpu = time.perf_counter(), time.process_time()
            run(c)
            times[c].append(time.perf_counter() - t)
            cpu[c].append(time.process_time() - t_cpu)
    return compile_s, times, cpu


def emit(record):
    print(json.dumps(record), flush=True)


def report_budget(args, med, loop, common):
    """Each attack's extrapolated cost per image at AutoAttack's budget, and the ensemble's."""
    import data
    s, names = args.steps, args.names
    targets = min(9, data.num_classes_of(args.dataset) - 1)
    per_image = {}
    for n in names:
        runs = targets if n in TARGETED else 1
        step = max(med[n, loop, 2 * s] - med[n, loop, s], 0.0) / s      # marginal cost of a step
        first = max(med[n, loop, s] - s * step, 0.0)                    # set-up: clean pass, first query
        per_image[n] = (first + step * BUDGET_STEPS[n]) * runs / args.batch_size
        emit({"bench": "attack_full_budget", "attack": n, "loop": loop, **common, "runs": runs,
              "steps_per_run": BUDGET_STEPS[n], "s_per_step": round(step, 5), "s_setup": round(first, 4),
              "s_per_image": round(per_image[n], 4), "extrapolated_from_steps": [s, 2 * s]})
    if "pgd" in names:
        emit({"bench": "over_pgd100", "loop": loop, **common,
              **{n: round(per_image[n] / per_image["pgd"], 2) for n in names}})
    if all(n in names for n in ENSEMBLE):
        total = sum(per_image[n] for n in ENSEMBLE)
        emit({"bench": "ensemble_full_budget", "loop": loop, **common, "members": list(ENSEMBLE),
              "every_image_survives_to_square": True, "s_per_image": round(total, 4),
              "share": {n: round(per_image[n] / total, 3) for n in ENSEMBLE},
              "over_pgd100": round(total / per_image["pgd"], 1) if "pgd" in names else None,
              "extrapolated_from_steps": [s, 2 * s]})


def main(argv=None):
    args = parse_args(argv)
    import attacks

    runner = make_runner(args)
    s, names, loops = args.steps, args.names, args.loop_modes
    cases = [(n, m, k) for m in loops for n in names for k in ((s, 2 * s) if args.budget else (s,))]
    info = dict(machine(), load_avg_1min_at_start=os.getloadavg()[0])
    compile_s, times, cpu = time_cases(args, runner, cases)
    config = {"model": args.model, "dataset": args.dataset, "width": args.width if args.model == "resnet18" else None,
              "batch_size": args.batch_size, "norm": "linf", "dynamics": args.dynamics, "repeats": args.repeats}
    common = {**config, "machine": info}
    med = {c: statistics.median(t) for c, t in times.items()}
    for (n, m, k) in cases:
        os.environ["NTK_ATTACK_LOOP"] = m
        emit({"bench": "attack_cost", "attack": n, "loop": m, "loop_used": attacks.loop_mode(), **config,
              "steps": k, "machine": info, "median_s": round(med[n, m, k], 4),
              "median_s_per_step": round(med[n, m, k] / k, 5),
              "median_process_cpu_s_per_step": round(statistics.median(cpu[n, m, k]) / k, 5),
              "min_s": round(min(times[n, m, k]), 4), "max_s": round(max(times[n, m, k]), 4),
              "warmup_s_with_compile": round(compile_s[n, m, k], 2)})
    for m in loops:
        if "pgd" in names and "apgd-ce" in names:
            emit({"bench": "apgd_ce_over_pgd", "loop": m, **config, "steps": s, "machine": info,
                  "ratio_of_medians": round(med["apgd-ce", m, s] / med["pgd", m, s], 3)})
    if "fori" in loops and "host" in loops:
        for n in names:
            emit({"bench": "fori_over_host", "attack": n, **config, "steps": s, "machine": info,
                  "ratio_of_medians": round(med[n, "fori", s] / med[n, "host", s], 3)})
    if args.budget:
        for m in loops:
            report_budget(args, med, m, common)


if __name__ == "__main__":
    main()
