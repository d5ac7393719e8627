"""bench/gpu_check.sh keeps working: its --cpu-smoke mode runs every stage of the GPU check on
the CPU with tiny sizes (installing a carried wheel first, as on a GPU machine) and leaves the
JSON-lines log the GPU run would. The figures are not checked, only that each stage ran and
the log holds what a GPU run needs."""
import json
import os
import signal
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow   # end to end: `pytest -m "not slow"` skips it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def run_check(args, timeout):
    env = dict(os.environ, PYTHON=sys.executable)
    for k in ("NTK_NUM_PROCESSES", "NTK_PROCESS_ID", "NTK_COORDINATOR", "NTK_DISTRIBUTED", "GPU_CHECK_WHEELS"):
        env.pop(k, None)
    p = subprocess.Popen(["bash", SCRIPT, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"gpu_check.sh ran over {timeout} s:\n{out[-4000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, out


def make_wheel(folder):
    """A minimal pure-Python wheel, standing in for the carried dm-haiku wheel."""
    name = "gpu_check_dummy-0.1"
    path = os.path.join(folder, "gpu_check_dummy-0.1-py3-none-any.whl")
    files = {"gpu_check_dummy/__init__.py": "VALUE = 1\n",
             f"{name}.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu_check_dummy\nVersion: 0.1\n",
             f"{name}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},,\n" for k in files) + f"{name}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{name}.dist-info/RECORD", record)
    return path


def read_log(out_dir):
    with open(os.path.join(out_dir, "gpu_check.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cpu_smoke(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels))
    out = tmp_path / "out"
    # Generous caps: the stage caps are sized for an idle machine, and a timed-out stage here
    # would say nothing about the script.
    rc, text = run_check(["--cpu-smoke", "--wheels", str(wheels), "--out", str(out), "--cap_scale", "3",
                          "--budget_s", "600"], timeout=700)
    assert rc == 0, text[-4000:]
    lines = read_log(out)
    by_stage = {r["stage"]: r for r in lines}
    assert [r["stage"] for r in lines] == ["start", "probe", "smoke", "train_8", "eval_std", "eval_lin", "ntk",
                                           "train_16", "summary"]
    assert by_stage["start"]["wheels"].strip() == "gpu_check_dummy-0.1-py3-none-any.whl"
    for name, r in by_stage.items():
        if name not in ("start", "summary"):
            assert r["ok"] and not r["timed_out"] and r["seconds"] > 0, r

    probe = by_stage["probe"]["records"][0]
    assert probe["platform"] == "cpu" and probe["jax"] and probe["haiku"][0].isdigit()
    assert all(probe[f"matmul_{k}_tflops"] > 0 for k in ("bf16", "fp32_default", "fp32_highest"))
    smoke = by_stage["smoke"]["checks"]
    assert smoke["kernel_written"] and smoke["run_exp_phase2_clean"] > 0.2
    for b in (8, 16):
        got = {r["measurement"]: r for r in by_stage[f"train_{b}"]["records"]}
        assert set(got) == {"train_standard", "train_linear", "pgd20"}
        assert all(r["img_per_s"] > 0 and r["config"]["batch_size"] == b for r in got.values())
    for stage, dyn in (("eval_std", "standard"), ("eval_lin", "linear")):
        r = by_stage[stage]["records"][0]
        assert r["dynamics"] == dyn and r["images"] == 40 and r["seconds"] > 0
    ntk = by_stage["ntk"]["records"]
    assert [r.get("n") for r in ntk if r.get("bench") == "ntk"] == [8, 16] and ntk[-1]["bench"] == "ntk_summary"

    s = by_stage["summary"]
    assert s["all_ok"] and s["mode"] == "cpu-smoke" and s["device_kind"] == "cpu"
    for key in ("train_standard@8", "train_linear@16"):
        entry = s["train_steps"][key]
        assert entry["fraction_of_measured_bf16_peak"] > 0 and entry["fraction_of_measured_fp32_highest_peak"] > 0
    ex = s["estimates"]["examples"]
    assert sorted(ex) == ["1", "2", "3", "4"] and all(v["seconds"] > 0 for v in ex.values())
    assert ex["2"]["seconds"] > ex["1"]["seconds"] and ex["4"]["seconds"] > ex["3"]["seconds"]
    assert os.path.getsize(out / "gpu_check.log") > 0


def test_budget_exhausted_skips_stages(tmp_path):
    rc, text = run_check(["--cpu-smoke", "--budget_s", "1", "--out", str(tmp_path)], timeout=120)
    assert rc == 1, text[-2000:]
    lines = read_log(tmp_path)
    skipped = [r for r in lines if r.get("skipped")]
    assert len(skipped) == 7 and not lines[-1]["all_ok"]
    assert lines[-1]["estimates"]["complete"] is False


def test_bad_wheels_folder(tmp_path):
    rc, text = run_check(["--cpu-smoke", "--wheels", str(tmp_path), "--out", str(tmp_path)], timeout=60)
    assert rc == 2 and text.strip() == f"error: no *.whl in --wheels folder {tmp_path}"
