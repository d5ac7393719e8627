"""Speed of the training and attack steps on full-width ResNet-18 (issue 3, "Performance").

Prints one JSON line per measurement:
  matmul_peak   fp32 peak of this machine: a jitted [n,n]x[n,n] jnp.dot, GFLOP/s;
  train_standard  train.make_train_step(apply, 'standard', True, sgd) (phase 1), img/s,
                  plus its FLOPs (XLA cost analysis of the compiled step) as a fraction of the peak;
  train_linear    the same with dynamics 'linear' and BatchNorm frozen (phase 2), img/s;
  pgd20           attacks.pgd, L-inf eps 4/255, 20 steps, step 2*eps/20 (the training attack), img/s,
                  plus the FLOPs of its 20 steps as a fraction of the peak;
  pgd_convs       every distinct convolution of ResNet-18 at the PGD batch size: milliseconds of
                  its forward pass and of its gradient with respect to the input (the two an
                  attack step runs), GFLOP/s, and one summary line with their sum over a step;
  data_feeding    N standard steps fed by data.batches + host->device transfer, against the same
                  N steps on a batch already on the device: the relative overhead.
Each figure is the median of `--repeats` timed runs after one warm-up run. For a comparison with
the reference code, run both on one machine: bench/bench_vs_reference.py.

  PYTHONPATH=. python bench/bench_train.py --data_dir DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import cpu_model, time_calls  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None,
                   help="CIFAR-10 directory for real images (a folder holding CIFAR-10 or a subset); random data of the "
                        "same shape when omitted")
    p.add_argument("--batch_size", type=int, default=128, help="train batch size")
    p.add_argument("--pgd_batch_size", type=int, default=128, help="batch size of the PGD-20 measurement")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 width")
    p.add_argument("--model", default="resnet18",
                   help="network (models.NETWORKS); anything but resnet18 only for quick checks of this script")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--feed_steps", type=int, default=3, help="steps in each data-feeding loop")
    p.add_argument("--matmul_n", type=int, default=4096, help="size of the square matmul for the peak")
    p.add_argument("--only", default="matmul_peak,train_standard,train_linear,pgd20,data_feeding",
                   help="comma-separated subset of measurements to run (pgd_convs runs only when named)")
    p.add_argument("--xla_flags", default="",
                   help="XLA_FLAGS to set before JAX starts; ignored if XLA_FLAGS is already set in the "
                        "environment. The scripts' own flag (utils.prefer_xla_cpu_kernels) is added unless "
                        "these set it or NTK_XLA_CPU_DEFAULTS=1")
    return p.parse_args(argv)


def machine_info():
    import jax
    dev = jax.devices()[0]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "device": f"{dev.platform}:{dev.device_kind}",
            "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _median(v):
    import numpy as np
    return float(np.median(np.asarray(v)))


def timed(fn, repeats):
    """Run fn() once to warm up (compile), then `repeats` times. fn must block until done.
    Returns (wall seconds list, process-CPU seconds list, warm-up seconds)."""
    t = time.perf_counter()
    fn()
    warm = time.perf_counter() - t
    return (*time_calls(fn, repeats), warm)


def _flops(compiled):
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0)) if ca else 0.0


class Emitter:
    """Prints one JSON line per measurement, with the machine and the load average."""

    def __init__(self):
        self.base = {"machine": machine_info(), "loadavg_1min_at_start": os.getloadavg()[0]}

    def __call__(self, name, config, walls, cpus, warm, **extra):
        rec = dict(self.base, measurement=name, config=config, repeats=len(walls),
                   median_s=_median(walls), min_s=min(walls), all_s=[round(w, 3) for w in walls],
                   median_process_cpu_s=_median(cpus), warmup_s=round(warm, 2), **extra)
        print(json.dumps(rec), flush=True)
        return rec


def load_images(args):
    """(x [N,32,32,3] float32, y [N] int32, source name): CIFAR-10 from --data_dir, else random."""
    import numpy as np

    import data
    if args.data_dir:
        ds = data.load_dataset("cifar10", args.data_dir)
        return ds.x_train, ds.y_train.astype(np.int32), "cifar10:" + str(args.data_dir)
    rng = np.random.default_rng(0)
    n = 5 * args.batch_size
    return rng.random((n, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32), "random"


def measure_matmul_peak(args, emit):
    """fp32 GFLOP/s of a jitted [n,n]x[n,n] jnp.dot."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    n = args.matmul_n
    a = jnp.asarray(np.random.default_rng(1).random((n, n), dtype=np.float32))
    b = jnp.asarray(np.random.default_rng(2).random((n, n), dtype=np.float32))
    mm = jax.jit(jnp.dot)
    walls, cpus, warm = timed(lambda: mm(a, b).block_until_ready(), args.repeats)
    peak = 2 * n ** 3 / _median(walls) / 1e9
    emit("matmul_peak", {"n": n, "dtype": "float32"}, walls, cpus, warm, gflops_per_s=peak)
    return peak


class Bench:
    """The network, its initial train state and one batch on the device."""

    def __init__(self, args, x_np, y_np, source):
        import jax
        import jax.numpy as jnp

        import models
        import train
        init, self.apply = models.get_model(args.model, 10, args.width)
        self.key = jax.random.PRNGKey(0)
        b = args.batch_size
        self.x, self.y = jax.device_put(jnp.asarray(x_np[:b])), jax.device_put(jnp.asarray(y_np[:b]))
        params, self.net_state = init(self.key, self.x, True)
        # The logits layer is zero at init; perturb it so gradients flow as in real training.
        params = dict(params)
        if "res_net18/~/logits" in params:
            params["res_net18/~/logits"] = jax.tree_util.tree_map(
                lambda w: w + 0.01 * jax.random.normal(self.key, w.shape, w.dtype), params["res_net18/~/logits"])
        self.params = params
        self.opt = train.make_optimizer(0.1)
        self.cfg = {"model": args.model, "width": args.width, "num_classes": 10, "batch_size": b,
                    "input_shape": [32, 32, 3], "data": source}

    def fresh_state(self):
        import jax.numpy as jnp

        import train
        return train.TrainState(self.params, self.net_state, self.opt.init(self.params), jnp.zeros((), jnp.int32))

    def train_step(self, dynamics, is_training):
        import train
        return train.make_train_step(self.apply, dynamics, is_training, self.opt)


def measure_train(args, emit, bench, name, dynamics, is_training, peak):
    """Steps per second of one train step on the device-resident batch, and its FLOPs' share of
    the matmul peak (FLOPs from XLA's cost analysis of the compiled step)."""
    import jax
    step = bench.train_step(dynamics, is_training)
    holder = [bench.fresh_state()]
    flops = _flops(step.lower(holder[0], bench.params, bench.x, bench.y).compile())

    def one():
        holder[0], metrics = step(holder[0], bench.params, bench.x, bench.y)
        jax.block_until_ready((holder[0], metrics))

    walls, cpus, warm = timed(one, args.repeats)
    gflops = flops / _median(walls) / 1e9
    extra = {"img_per_s": args.batch_size / _median(walls), "step_gflop_xla_cost_analysis": flops / 1e9,
             "achieved_gflops_per_s": gflops}
    if peak:
        extra["fraction_of_matmul_peak"] = gflops / peak
    emit(name, dict(bench.cfg, dynamics=dynamics, bn_training=is_training), walls, cpus, warm, **extra)


def measure_pgd(args, emit, bench, x_np, y_np, peak):
    """attacks.pgd, L-inf eps 4/255, 20 steps of 2*eps/20 (the training attack), and the FLOPs of
    its 20 steps (XLA's cost analysis of one compiled step) as a share of the matmul peak."""
    import jax.numpy as jnp
    import numpy as np

    import attacks
    p = args.pgd_batch_size
    xp = jnp.asarray(np.resize(x_np, (p,) + x_np.shape[1:]))
    yp = jnp.asarray(np.resize(y_np, (p,)))
    predict = attacks.make_predict(bench.apply, "standard")
    variables = (bench.params, bench.params, bench.net_state)
    eps = 4 / 255
    step_flops = _flops(attacks._pgd_step_jit.lower(jnp.int32(0), xp, variables, xp, yp, eps, 2 * eps / 20,
                                                    predict=predict, norm="linf").compile())
    walls, cpus, warm = timed(lambda: attacks.pgd(predict, variables, xp, yp, bench.key, eps, 2 * eps / 20,
                                                  steps=20, norm="linf").block_until_ready(), args.repeats)
    gflops = 20 * step_flops / _median(walls) / 1e9
    extra = {"img_per_s": p / _median(walls), "step_gflop_xla_cost_analysis": step_flops / 1e9,
             "achieved_gflops_per_s": gflops}
    if peak:
        extra["fraction_of_matmul_peak"] = gflops / peak
    emit("pgd20", dict(bench.cfg, batch_size=p, norm="linf", eps=eps, steps=20, step_size=2 * eps / 20,
                       bn_training=False, loop=attacks.loop_mode()), walls, cpus, warm, **extra)


def resnet18_convs(width):
    """[(name, input size, in channels, out channels, kernel, stride, count)]: the distinct
    convolutions of models.ResNet18 on 32x32 RGB images, and how many of each it has."""
    convs, size, cin = [("stem", 32, 3, width, 3, 1, 1)], 32, width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        cout = width * mult
        if stride > 1:
            convs += [(f"down_{cout}", size, cin, cout, 3, stride, 1),
                      (f"shortcut_{cout}", size, cin, cout, 1, stride, 1)]
            size //= stride
        convs.append((f"conv_{cout}", size, cout, cout, 3, 1, 3 if stride > 1 else 4))
        cin = cout
    return convs


def measure_pgd_convs(args, emit, peak):
    """Forward and input-gradient time of every distinct ResNet-18 convolution at the PGD batch
    size (SAME padding, as hk.Conv2D), one line each, then their sum over one attack step."""
    import jax
    import numpy as np
    from jax import lax
    rng = np.random.default_rng(0)
    p = args.pgd_batch_size
    total_ms, total_gflop = 0.0, 0.0
    for name, size, cin, cout, k, stride, count in resnet18_convs(args.width):
        def conv(x, w, stride=stride):
            return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.device_put(rng.standard_normal((p, size, size, cin)).astype(np.float32))
        w = jax.device_put((rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32))
        g = jax.device_put(np.ones(jax.eval_shape(conv, x, w).shape, np.float32))
        fwd = jax.jit(conv)
        grad_x = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
        gflop = 2 * g.size * k * k * cin / 1e9   # the forward pass's FLOPs; the input gradient's are as many
        ms = {}
        for kind, f, a in (("fwd", fwd, (x, w)), ("grad_x", grad_x, (x, w, g))):
            walls, cpus, warm = timed(lambda f=f, a=a: f(*a).block_until_ready(), args.repeats)
            ms[kind] = 1000 * _median(walls)
            extra = {"gflops_per_s": gflop / _median(walls), "count_in_resnet18": count}
            if peak:
                extra["fraction_of_matmul_peak"] = extra["gflops_per_s"] / peak
            emit(f"pgd_convs:{name}:{kind}", {"batch_size": p, "input": [size, size, cin], "out_channels": cout,
                                              "kernel": k, "stride": stride}, walls, cpus, warm, **extra)
        total_ms += count * (ms["fwd"] + ms["grad_x"])
        total_gflop += count * 2 * gflop
    print(json.dumps(dict(emit.base, measurement="pgd_convs:sum_per_attack_step",
                          config={"model": "resnet18", "width": args.width, "batch_size": p},
                          ms=total_ms, gflop=total_gflop, gflops_per_s=total_gflop / total_ms * 1000,
                          loadavg_1min=os.getloadavg()[0])), flush=True)


def measure_feeding(args, emit, bench, x_np, y_np):
    """N phase-1 steps fed by data.batches + host->device transfer against the same N steps on a
    batch already on the device, interleaved so slow periods of a shared machine hit both."""
    import jax

    import data
    b = args.batch_size
    n_feed = min(len(x_np), args.feed_steps * b) // b * b
    xs, ys = x_np[:n_feed], y_np[:n_feed]
    step = bench.train_step("standard", True)
    holder = [bench.fresh_state()]

    def placed_loop():
        for _ in range(n_feed // b):
            holder[0], _ = step(holder[0], bench.params, bench.x, bench.y)
        jax.block_until_ready(holder[0])

    def fed_loop():
        feed = 0.0
        it = data.batches(xs, ys, b, seed=0)
        for _ in range(n_feed // b):
            t = time.perf_counter()
            xb, yb = next(it)
            xb, yb = jax.device_put(xb), jax.device_put(yb)
            feed += time.perf_counter() - t
            holder[0], _ = step(holder[0], bench.params, xb, yb)
        jax.block_until_ready(holder[0])
        return feed

    placed_loop()  # warm-up (compile)
    walls_p, walls_f, feeds = [], [], []
    for _ in range(2):
        t = time.perf_counter(); placed_loop(); walls_p.append(time.perf_counter() - t)
        t = time.perf_counter(); feeds.append(fed_loop()); walls_f.append(time.perf_counter() - t)
    placed, fed = min(walls_p), min(walls_f)
    rec = dict(emit.base, measurement="data_feeding", config=dict(bench.cfg, steps_per_loop=n_feed // b, loops=2),
               placed_loop_s=[round(v, 3) for v in walls_p], fed_loop_s=[round(v, 3) for v in walls_f],
               host_feed_s=[round(v, 4) for v in feeds], overhead_fraction_best_loops=(fed - placed) / placed,
               host_feed_fraction=_median(feeds) / placed, goal="< 0.05")
    print(json.dumps(rec), flush=True)


def run(args):
    only = set(args.only.split(","))
    emit = Emitter()
    x_np, y_np, source = load_images(args)
    peak = measure_matmul_peak(args, emit) if "matmul_peak" in only else None
    bench = Bench(args, x_np, y_np, source)
    for name, dynamics, is_training in (("train_standard", "standard", True), ("train_linear", "linear", False)):
        if name in only:
            measure_train(args, emit, bench, name, dynamics, is_training, peak)
    if "pgd20" in only:
        measure_pgd(args, emit, bench, x_np, y_np, peak)
    if "pgd_convs" in only:
        measure_pgd_convs(args, emit, peak)
    if "data_feeding" in only:
        measure_feeding(args, emit, bench, x_np, y_np)


def main(argv=None):
    args = parse_args(argv)
    if "XLA_FLAGS" not in os.environ and args.xla_flags:
        os.environ["XLA_FLAGS"] = args.xla_flags  # must happen before JAX is imported
    import utils  # noqa: F401  (adds the project's XLA:CPU flags, as every script does, before JAX starts)
    run(args)


if __name__ == "__main__":
    main()
