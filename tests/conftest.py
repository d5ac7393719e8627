import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Share compiled executables between tests and test runs (see utils.enable_compilation_cache).
import utils  # noqa: E402

utils.enable_compilation_cache()
