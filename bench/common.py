"""Helpers shared by the benchmarks: the machine record of every JSON line, and random
ResNet weights that skip Haiku's slow eager initialization (models.random_variables)."""
import os

from models import random_variables  # noqa: F401  (re-exported for the benchmarks)
from timing import cpu_model


def machine():
    import jax
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
