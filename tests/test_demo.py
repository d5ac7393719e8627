"""demo.sh end to end in its reduced mode (DEMO_QUICK=1): every step runs and the final table
and figures are produced."""
import os
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DEMO_QUICK="1", DEMO_OUT=str(out))
    r = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for row in ("| phase-1 CC |", "| phase-1 AC |", "| phase-2 centered on AT kernel |"):
        assert row in r.stdout
    assert "transfer: phase-1 CC on phase-1 AC's PGD examples" in r.stdout
    figures = [line.strip() for line in r.stdout.split("figures:")[1].splitlines() if line.strip()]
    assert len(figures) >= 4 and all(os.path.getsize(f) > 1000 for f in figures)
    assert (out / "phase1_AC" / "ntk" / "saved_kernel_class_0_20.pkl").exists()
