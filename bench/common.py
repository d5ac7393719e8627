"""Helpers shared by the benchmarks: the machine record of every JSON line, and random
ResNet weights that skip Haiku's slow eager initialization (models.random_variables)."""
import os
import platform

from models import random_variables  # noqa: F401  (re-exported for the benchmarks)


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
