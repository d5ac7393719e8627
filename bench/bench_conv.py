"""One 3x3 convolution of ResNet-18's first stage (NHWC, 64 -> 64 channels, stride 1, SAME) on
this JAX: forward, gradient with respect to the input, to the filter, and both, for XLA's
convolution and for two formulations as matrix products (im2col: the 9 shifted copies of the
input concatenated then one dot; shift-sum: 9 dots summed). Run it under two JAX versions (for
example the reference's stack and this project's) to see which part of a train step changed.

Prints one JSON line: the machine, JAX's version, the shapes, and the median milliseconds of
`--repeats` calls after a warm-up, per formulation and pass.

  python bench/bench_conv.py --batch_size 32
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The scripts' XLA:CPU flags, set before JAX starts (utils imports no JAX; on a jaxlib other than
# 0.10.x, such as the reference's 0.4.23, it sets nothing). NTK_XLA_CPU_DEFAULTS=1: XLA's defaults.
import utils  # noqa: E402,F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from timing import cpu_model  # noqa: E402


def formulations(h):
    dn = ("NHWC", "HWIO", "NHWC")

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)

    def shifted(x):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [xp[:, i:i + h, j:j + h, :] for i in range(3) for j in range(3)]

    def im2col(x, w):
        cols = jnp.concatenate(shifted(x), axis=-1)
        return jnp.einsum("nhwk,kd->nhwd", cols, w.reshape(-1, w.shape[-1]))

    def shift_sum(x, w):
        return sum(jnp.einsum("nhwc,cd->nhwd", s, w[k // 3, k % 3]) for k, s in enumerate(shifted(x)))
    return {"xla": xla, "im2col": im2col, "shift_sum": shift_sum}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((a.batch_size, a.size, a.size, a.channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, a.channels, a.channels)) * 0.05, jnp.float32)
    out = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "device": str(jax.devices()[0])},
           "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "config": vars(a),
           "load_avg_1min": os.getloadavg()[0]}
    for name, conv in formulations(a.size).items():
        def loss(x, w, conv=conv):
            return jnp.sum(conv(x, w) ** 2)
        passes = {"fwd": jax.jit(conv), "grad_x": jax.jit(jax.grad(loss, 0)), "grad_w": jax.jit(jax.grad(loss, 1)),
                  "grad_both": jax.jit(jax.grad(loss, (0, 1)))}
        for kind, f in passes.items():
            jax.block_until_ready(f(x, w))
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                jax.block_until_ready(f(x, w))
                ts.append(time.perf_counter() - t)
            out[f"{name}_{kind}_ms"] = round(1000 * float(np.median(ts)), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
