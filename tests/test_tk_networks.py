"""Tsilivis & Kempe's finite FC, Conv and Myrtle networks (`--model fc|conv|myrtle`) through the
scripts' own path: run_exp.py makes the checkpoint at initialization, calculate_kernel.py takes
its empirical NTK, and that kernel approaches calculate_kernel.py --arch's analytic one on the
same images as the width grows (the Monte Carlo estimate, error ~ 1/sqrt(width))."""
import numpy as np
import pytest

import utils
from cli_harness import call

pytestmark = pytest.mark.slow   # six tiny runs and their kernels


def _kernel(cwd, script, argv):
    code, out, err = call(script, argv, str(cwd))
    assert code == 0, err[-2000:]
    return out


def _relative_error(tmp_path, arch, depth, width):
    run = f"{arch}{depth}_w{width}"
    _kernel(tmp_path, "run_exp", ["--dataset", "digits", "--model", arch, "--depth", str(depth), "--width", str(width),
                                  "--standard_epochs", "0", "--linear_epochs", "0", "--skip_first_test", "--save_models", "--save_path", run,
                                  "--no_progress"])
    images = ["--dataset_size", "20", "--class_index", "0", "--no_progress"]
    _kernel(tmp_path, "calculate_kernel", ["--model_path", f"{run}/parameters_final.pkl", *images])
    _kernel(tmp_path, "calculate_kernel", ["--arch", arch, "--depth", str(depth), "--dataset", "digits", *images,
                                           "--bonus_dir", f"inf_{arch}{depth}"])
    finite = utils.restricted_load(str(tmp_path / run / "saved_kernel_class_0_20.pkl"))
    analytic = utils.restricted_load(str(tmp_path / f"inf_{arch}{depth}" / "saved_kernel_class_0_20.pkl"))
    assert np.array_equal(finite["indices"], analytic["indices"])
    ckpt = utils.restricted_load(str(tmp_path / run / "parameters_final.pkl"))
    assert ckpt["meta"]["architecture"] == {"depth": depth, "W_std": 2 ** 0.5, "b_std": 0.1, "parameterization": "ntk"}
    return np.linalg.norm(finite["kernel"] - analytic["kernel"]) / np.linalg.norm(analytic["kernel"])


@pytest.mark.parametrize("arch, depth, narrow, wide, bound", [
    ("fc", 1, 256, 4096, 0.06),
    ("conv", 1, 64, 512, 0.1),
    ("myrtle", 5, 16, 128, 0.45),
])
def test_a_wide_networks_empirical_ntk_approaches_the_infinite_one(tmp_path, arch, depth, narrow, wide, bound):
    e_narrow, e_wide = (_relative_error(tmp_path, arch, depth, w) for w in (narrow, wide))
    assert e_wide < bound and e_wide < 0.7 * e_narrow, (e_narrow, e_wide)


def test_architecture_flags_are_checked_in_one_line(tmp_path):
    for argv, message in ((["--model", "fc"], "--model fc needs --depth"),
                          (["--model", "myrtle", "--depth", "6"], "a Myrtle network has depth 5, 7 or 10"),
                          (["--model", "mlp_skinny", "--depth", "2"], "--depth is for --model fc, conv or myrtle")):
        code, _, err = call("run_exp", ["--dataset", "digits", *argv, "--save_path", "x"], str(tmp_path))
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()
