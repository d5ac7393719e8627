"""Time one NTK eigen-image of visualize_ntk_features.py on the full-width ResNet-18.

One eigen-image = forming v = sum_j u[j] grad_theta f_c(x_j) over the n kernel images (one
chunked vjp) + `steps` signed-gradient steps on cos(grad_theta f_c(x), v), jitted in a
lax.fori_loop. Prints one JSON line per measurement (machine, configuration, median of
`--repeats` runs after one warm-up, compilation excluded):

- `direction`: forming v over the n images;
- `loop/<variant>`: the loop for `--steps` steps, and its per-step time, for
  * `one_vjp/host` (the script's default on CPU): one vjp in theta gives g, and <g, v> and
    ||g|| both come from it; the jitted step is dispatched from a Python loop;
  * `one_vjp/fori` (the script's default elsewhere, `--loop fori`): the same step, the whole
    loop one jitted lax.fori_loop (slow on XLA:CPU, jax-ml/jax#12868);
  * `jvp_plus_vjp/host` (for comparison): <g, v> from a jvp along v and ||g|| from a separate
    vjp, i.e. two forward passes per step;
- `eigen_image`: direction + 600 steps. When `--steps` < 600 it is EXTRAPOLATED from the
  per-step time (the field `extrapolated_from_steps` says so); `--steps 600` measures it.
- `ratio`: each other variant's per-step time / the default variant's, all measured in this
  run, interleaved.

  PYTHONPATH=. python bench/bench_visualize.py                    # 20 steps, extrapolated to 600
  PYTHONPATH=. python bench/bench_visualize.py --steps 600 --repeats 5

Random weights (non-zero logits layer, BatchNorm in inference mode at mean 0 / variance 1) and
uniform-noise images: the cost of a step does not depend on them.
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


def two_pass_ascend(f, class_index):
    """The comparison loop: <g, v> by a jvp along v and ||g|| by a separate vjp (two forward
    passes per step), the jitted step dispatched from a host loop like the script's 'host'."""
    import jax
    import jax.numpy as jnp
    from tangent_features import _tree_vdot

    def cosine(params, v, x):
        def out(p):
            return f(p, x[None])[0, class_index]
        _, g_dot_v = jax.jvp(out, (params,), (jax.tree_util.tree_map(lambda a: a[0], v),))
        g = jax.grad(out)(params)
        return g_dot_v / (jnp.sqrt(_tree_vdot(g, g)) * jnp.sqrt(_tree_vdot(v, v)))

    @jax.jit
    def step(params, v, x, sign, step_size):
        c, grad_x = jax.value_and_grad(lambda x: cosine(params, v, x))(x)
        return jnp.clip(x + sign * step_size * jnp.sign(grad_x), 0.0, 1.0), c

    def ascend(params, v, x0, sign, step_size, steps):
        x, history = x0, []
        for _ in range(steps + 1):
            x, c = step(params, v, x, sign, step_size)
            history.append(c)
        return x, jnp.stack(history)
    return ascend


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="loop steps per timed run (600 = no extrapolation)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--n", type=int, default=50, help="kernel images v is formed over")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = full)")
    p.add_argument("--image", default="32,32,3", help="image shape H,W,C")
    p.add_argument("--variants", default="one_vjp/host,one_vjp/fori,jvp_plus_vjp/host",
                   help="loops to time (comma-separated); the script's default on this backend "
                        "(one_vjp/host on CPU, one_vjp/fori elsewhere) gives the eigen_image line and the "
                        "others are compared with it")
    return p.parse_args(argv)


def _seconds(fn):
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def time_loops(args):
    """Warm-up, then `--repeats` interleaved rounds of the direction v and each loop variant.
    Returns (config, warm-up seconds, seconds lists), keyed by measurement name."""
    import jax.numpy as jnp
    import numpy as np

    import models
    import tangent_features

    shape = tuple(int(s) for s in args.image.split(","))
    init, apply = models.get_model("resnet18", 10, args.width)
    params, state = random_variables(init, (1,) + shape)

    def f(p, x):
        return apply(p, state, None, x, False)[0]

    tools = tangent_features.make_tangent_fns(f, (0,), loop="host")
    tools_fori = tangent_features.make_tangent_fns(f, (0,), loop="fori")
    rng = np.random.default_rng(0)
    x_kernel = rng.uniform(size=(args.n,) + shape).astype(np.float32)
    u = rng.normal(size=(args.n, 1))
    u /= np.linalg.norm(u)
    x0 = jnp.full(shape, 0.5, jnp.float32)
    two_pass = two_pass_ascend(f, 0)
    loops = {"one_vjp/host": lambda v: tools.ascend(params, v, x0, 1.0, 1e-3, steps=args.steps),
             "one_vjp/fori": lambda v: tools_fori.ascend(params, v, x0, 1.0, 1e-3, steps=args.steps),
             "jvp_plus_vjp/host": lambda v: two_pass(params, v, x0, 1.0, 1e-3, steps=args.steps)}
    config = {"model": "resnet18", "width": args.width, "image": list(shape), "n": args.n,
              "num_params": models.count_params(params), "steps_timed": args.steps, "repeats": args.repeats}
    variants = args.variants.split(",")
    compile_s = {"direction": _seconds(lambda: tools.direction(params, x_kernel, u))}
    v = tools.direction(params, x_kernel, u)
    for name in variants:
        compile_s[name] = _seconds(lambda: loops[name](v))  # warm-up (includes compilation)
    times = {name: [] for name in ["direction"] + variants}
    for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
        times["direction"].append(_seconds(lambda: tools.direction(params, x_kernel, u)))
        for name in variants:
            times[name].append(_seconds(lambda: loops[name](v)))
    return config, compile_s, times


def main(argv=None):
    args = parse_args(argv)
    import attacks

    config, compile_s, times = time_loops(args)
    variants = args.variants.split(",")
    base = {"machine": machine(), "config": config}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(json.dumps({**base, "measurement": "direction", "median_s": med["direction"],
                      "runs_s": times["direction"], "warmup_with_compile_s": compile_s["direction"]}))
    per_step = {}
    for name in variants:
        per_step[name] = med[name] / (args.steps + 1)  # steps + 1 cosine evaluations (see ascend)
        print(json.dumps({**base, "measurement": f"loop/{name}", "median_s": med[name],
                          "per_step_s": per_step[name], "runs_s": times[name],
                          "warmup_with_compile_s": compile_s[name]}))
    # the eigen_image line uses what the script runs by default on this backend (--loop auto)
    main_variant = "one_vjp/" + attacks.loop_mode("auto")
    if main_variant not in variants:
        main_variant = variants[0]
    record = {**base, "measurement": "eigen_image", "variant": main_variant, "steps": 600}
    if args.steps == 600:
        record["median_s"] = med["direction"] + med[main_variant]
    else:
        record["median_s_extrapolated"] = med["direction"] + 601 * per_step[main_variant]
        record["extrapolated_from_steps"] = args.steps
    print(json.dumps(record))
    for other in [name for name in variants if name != main_variant]:
        print(json.dumps({**base, "measurement": "ratio", "what": f"{other} / {main_variant} per step",
                          "ratio": per_step[other] / per_step[main_variant]}))


if __name__ == "__main__":
    main()
