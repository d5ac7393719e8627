"""Helpers shared by the benchmarks: the machine record of every JSON line, and random
ResNet weights that skip Haiku's slow eager initialization."""
import os
import platform


def machine():
    import jax
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def random_variables(init, input_shape, seed=0):
    """init's trees filled with numpy draws (compiling Haiku's initializers for ResNet-18 on CPU
    takes longer than the benchmark). Weights N(0, 2/fan_in), BN scale 1, offsets 0, BN
    statistics mean 0 / variance 1."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    rng = np.random.default_rng(seed)
    shapes, state_shapes = jax.eval_shape(lambda k, x: init(k, x, True), jax.random.PRNGKey(0),
                                          jnp.zeros(input_shape, jnp.float32))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "offset" in name or name.endswith("['b']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.dtype)

    def stat(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name and "average" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "counter" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes), jax.tree_util.tree_map_with_path(stat, state_shapes)
