"""Side by side with the reference implementation (yolky/adversarial_ntk_evolution), same machine,
same run, interleaved rounds.

The reference's own step functions run in a subprocess of a Python that has its stack (JAX 0.4.23,
dm-haiku 0.0.11, optax 0.1.7, neural-tangents 0.6.5); ours run in this process. Both get the same
shapes, the same random CIFAR-shaped images and labels, and the same ResNet-18 weights (the
reference's Haiku tree and ours have the same names and shapes). Measured paths:

  train_standard  reference run_exp.do_training_step (SGD 0.1, momentum 0.9, BatchNorm training)
                  vs train.make_train_step(apply, 'standard', True, ...)
  train_linear    reference run_exp.do_training_step_linear (SGD 0.01, BatchNorm frozen)
                  vs train.make_train_step(apply, 'linear', False, ...)
  pgd20           reference test_functions.perturb (L-inf, eps 4/255, step 2 eps/20, 20 steps)
                  vs attacks.pgd with the same settings
  ntk             class-0 empirical NTK of n images: the reference's calculate_kernel.py scheme
                  (neural_tangents.empirical_kernel_fn(implementation=2), nt.batch(batch_size=4),
                  jitted, upper-triangle 4x4 blocks) vs ntk.empirical_ntk

After one warm-up call per path and side (compilation), each round times every path on both sides,
the reference first in odd rounds and ours first in even rounds, so a change of load during the
run hits both. One JSON line per path: both sides' median seconds over all timed calls, the
per-round medians, the speed-up (reference seconds / ours: above 1 means ours is faster) overall
and per round, process CPU seconds per call on each side, and the 1-minute load average before
each timing.

The reference's code is taken from `--ref_code` (a checkout or `git archive` of the public
repository), copied to a temporary directory, and patched there only so that it parses and
imports: its `--dataset` argparse line and `jax.tree_util.tree_multimap` (removed from JAX). Its
modules import torch and torchvision at module level but never use them on these paths: stand-in
modules are put first on its path instead of installing torch. See bench/README.md for making
the reference's Python.

  PYTHONPATH=. python bench/bench_vs_reference.py --ref_code /tmp/refcode \\
      --ref_python /tmp/refvenv/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import time_calls  # noqa: E402  (standard library only: safe under the reference's Python)

PATHS = ("train_standard", "train_linear", "pgd20", "ntk")
EPS = 4 / 255
PGD_STEPS = 20
BLOCK = 4  # the reference's kernel block size

# The two places the reference does not parse or import under any JAX >= 0.3.16.
PATCHES = {
    "run_exp.py": [("default = help = 'cifar10', 'dataset. either cifar10 or cifar100'",
                    "default = 'cifar10', help = 'dataset. either cifar10 or cifar100'")],
    "utils.py": [("jax.tree_util.tree_multimap", "jax.tree_util.tree_map")],
}

STUB = '''"""Stand-in for a module the reference imports at module level but does not use on the
benchmarked paths (written by bench_vs_reference.py)."""


class _Stub:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return _Stub()


def __getattr__(name):
    return _Stub
'''
STUB_MODULES = ("torch", "torch.utils", "torch.utils.data", "torchvision", "torchvision.transforms",
                "torchvision.datasets")


# --------------------------------------------------------------------------------------
# Preparing the reference's code
# --------------------------------------------------------------------------------------
def prepare_reference(src, dst, stub_neural_tangents=False):
    """Copy the reference's *.py from `src` to `dst`, apply PATCHES there, and write stand-ins
    for torch/torchvision (and neural_tangents if asked) under dst/_stubs. Returns dst."""
    missing = [f for f in ("run_exp.py", "models.py", "test_functions.py", "utils.py",
                           "modified_resnets.py") if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise SystemExit(f"error: --ref_code {src} does not hold the reference's code (missing {', '.join(missing)})")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".py"):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    for name, subs in PATCHES.items():
        path = os.path.join(dst, name)
        with open(path) as f:
            text = f.read()
        for old, new in subs:
            if old in text:
                text = text.replace(old, new)
            elif new not in text:
                raise SystemExit(f"error: cannot patch {name}: neither {old!r} nor {new!r} is in it")
        with open(path, "w") as f:
            f.write(text)
    stubs = os.path.join(dst, "_stubs")
    modules = STUB_MODULES + (("neural_tangents",) if stub_neural_tangents else ())
    for mod in modules:
        d = os.path.join(stubs, *mod.split("."))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "__init__.py"), "w") as f:
            f.write(STUB)
    return dst


def _save_inputs(path, params, net_state, x, y, x_ntk):
    import numpy as np
    arrays = {"x": np.asarray(x), "y": np.asarray(y), "x_ntk": np.asarray(x_ntk)}
    for tag, tree in (("params", params), ("state", net_state)):
        for mod, leaves in tree.items():
            for name, leaf in leaves.items():
                arrays[f"{tag}|{mod}|{name}"] = np.asarray(leaf)
    np.savez(path, **arrays)


def _load_inputs(path):
    import numpy as np
    z = np.load(path)
    trees = {"params": {}, "state": {}}
    for key in z.files:
        if "|" in key:
            tag, mod, name = key.split("|")
            trees[tag].setdefault(mod, {})[name] = z[key]
    return trees["params"], trees["state"], z["x"], z["y"], z["x_ntk"]


# --------------------------------------------------------------------------------------
# The reference's side (runs under the reference's Python, never imports our modules)
# --------------------------------------------------------------------------------------
def reference_paths(inputs, ntk_ns):
    """{path: (warm_up(), call())} built from the reference's own functions."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import models as ref_models
    import run_exp
    import test_functions
    params0, net_state0, x_np, y_np, x_ntk = _load_inputs(inputs)
    to_j = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    params0, net_state0 = to_j(params0), to_j(net_state0)
    init, apply = ref_models.get_model("resnet18", 10)
    rng = jax.random.PRNGKey(0)
    np.random.seed(0)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    out = {}

    _, sgd1 = optax.chain(optax.sgd(0.1, momentum=0.9))
    opt_init, sgd2 = optax.chain(optax.sgd(0.01, momentum=0.9))
    s1 = {"params": params0, "net_state": net_state0, "opt": opt_init(params0)}

    def standard():
        _, s1["params"], s1["net_state"], s1["opt"], acc = run_exp.do_training_step(
            s1["params"], params0, s1["net_state"], apply, s1["opt"], sgd1, rng, x, y)
        jax.block_until_ready((s1["params"], s1["net_state"], s1["opt"], acc))
    out["train_standard"] = (standard, standard)

    s2 = {"lin": params0, "opt": opt_init(params0)}

    def linear():
        _, _, s2["lin"], _, s2["opt"], acc = run_exp.do_training_step_linear(
            params0, s2["lin"], net_state0, apply, s2["opt"], sgd2, rng, x, y)
        jax.block_until_ready((s2["lin"], s2["opt"], acc))
    out["train_linear"] = (linear, linear)

    def pgd():
        adv = test_functions.perturb(params0, params0, net_state0, apply, rng, x_np, y_np, EPS,
                                     2 * EPS / PGD_STEPS, PGD_STEPS)
        jax.block_until_ready(adv)
    out["pgd20"] = (pgd, pgd)

    import neural_tangents as nt
    if "_stubs" not in (getattr(nt, "__file__", None) or "_stubs"):
        from utils import bind

        # calculate_kernel.py --class_index 0: the class logit, BatchNorm frozen, nt's
        # implementation 2, batches of 4, jitted, every 4x4 block of the upper triangle.
        def f(p, xb):
            return bind(apply, ..., net_state0, rng, is_training=False)(p, xb)[0][:, 0:1]
        kernel_fn = jax.jit(nt.batch(nt.empirical_kernel_fn(f, implementation=2), batch_size=BLOCK),
                            static_argnums=(2,))
        for n in ntk_ns:
            xs = x_ntk[:n]

            def kernel(xs=xs, n=n):
                k = np.zeros([n, n])
                for a in range(n // BLOCK):
                    for b in range(a, n // BLOCK):
                        k[a * BLOCK:(a + 1) * BLOCK, b * BLOCK:(b + 1) * BLOCK] = kernel_fn(
                            xs[a * BLOCK:(a + 1) * BLOCK], xs[b * BLOCK:(b + 1) * BLOCK], "ntk", params0)
                return np.triu(k) + np.triu(k, k=1).T

            def warm(xs=xs):  # every block has the same shapes: one block compiles
                np.asarray(kernel_fn(xs[:BLOCK], xs[:BLOCK], "ntk", params0))
            out[f"ntk{n}"] = (warm, kernel)
    return out


def worker(args):
    """Serve timing requests on stdin (one JSON object a line), answer on stdout."""
    answer = sys.stdout
    sys.stdout = sys.stderr  # anything the reference prints must not corrupt the answers
    import jax
    import jaxlib
    paths = reference_paths(args.inputs, [int(n) for n in args.ntk_n.split(",") if n])
    versions = {"python": sys.executable, "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    for mod in ("haiku", "optax", "neural_tangents"):
        try:
            version = getattr(__import__(mod), "__version__", None)
            versions[mod] = version if isinstance(version, str) else "stub"
        except Exception:  # noqa: BLE001
            versions[mod] = None
    answer.write(json.dumps({"ready": sorted(paths), "versions": versions}) + "\n")
    answer.flush()
    for line in sys.stdin:
        req = json.loads(line)
        warm, call = paths[req["path"]]
        if req["op"] == "warm":
            t = time.perf_counter()
            warm()
            res = {"warmup_s": time.perf_counter() - t}
        else:
            walls, cpus = time_calls(call, req["repeats"])
            res = {"walls": walls, "cpus": cpus}
        answer.write(json.dumps(res) + "\n")
        answer.flush()


class Reference:
    """The worker subprocess under the reference's Python."""

    def __init__(self, python, code_dir, inputs, ntk_ns):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
        env["PYTHONPATH"] = os.pathsep.join([os.path.join(code_dir, "_stubs"), code_dir])
        env["PYTHONNOUSERSITE"] = "1"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # neural-tangents imports TensorFlow
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", "--inputs", inputs, "--ntk_n", ",".join(map(str, ntk_ns))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=code_dir)
        hello = self._read()
        self.paths, self.versions = hello["ready"], hello["versions"]

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the reference worker exited (status {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# --------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------
def our_paths(params0, net_state0, x, y, x_ntk, ntk_ns):
    import jax
    import jax.numpy as jnp

    import attacks
    import models
    import ntk
    import train
    _, apply = models.get_model("resnet18", 10, 64)
    out = {}
    for path, dynamics, bn, lr in (("train_standard", "standard", True, 0.1),
                                   ("train_linear", "linear", False, 0.01)):
        opt = train.make_optimizer(lr)
        step = train.make_train_step(apply, dynamics, bn, opt)
        holder = [train.TrainState(params0, net_state0, opt.init(params0), jnp.zeros((), jnp.int32))]

        def call(step=step, holder=holder):
            holder[0], metrics = step(holder[0], params0, x, y)
            jax.block_until_ready((holder[0], metrics))
        out[path] = (call, call)

    predict = attacks.make_predict(apply, "standard")
    key = jax.random.PRNGKey(0)

    def pgd():
        attacks.pgd(predict, (params0, params0, net_state0), x, y, key, EPS, 2 * EPS / PGD_STEPS,
                    steps=PGD_STEPS, norm="linf").block_until_ready()
    out["pgd20"] = (pgd, pgd)

    f = ntk.NetFn(apply, net_state0)
    for n in ntk_ns:
        xs = jnp.asarray(x_ntk[:n])

        def kernel(xs=xs):
            return ntk.empirical_ntk(f, params0, xs, class_index=0)
        out[f"ntk{n}"] = (kernel, kernel)
    return out


# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref_code", help="directory holding the reference's code (run_exp.py, models.py, ...); "
                                      "it is copied and patched in a temporary directory, never modified")
    p.add_argument("--ref_python", help="Python interpreter with the reference's stack (JAX 0.4.23, dm-haiku "
                                        "0.0.11, optax 0.1.7, neural-tangents 0.6.5); this Python to run the "
                                        "reference's code under our JAX (the ntk path then needs neural-tangents)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (reference and ours in each)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls per side per round for the train steps (pgd20 and ntk: 1)")
    p.add_argument("--ntk_n", default="32,100", help="comma-separated kernel sizes (multiples of 4)")
    p.add_argument("--batch_size", type=int, default=128, help="batch of the train steps and of PGD-20")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images, labels and weights")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and not (args.ref_code and args.ref_python):
        p.error("--ref_code and --ref_python are required")
    return args


def make_inputs(args, ntk_ns):
    """The shared inputs: a random full-width ResNet-18 (logits layer non-zero, so gradients
    reach every layer in both codes), a batch of random CIFAR-shaped images and labels, and the
    kernel's images. Returns (params, net_state, x, y, x_ntk), numpy images."""
    import jax.numpy as jnp
    import numpy as np

    import models
    from common import random_variables
    b = args.batch_size
    rng = np.random.default_rng(args.seed)
    x_np = rng.random((b, 32, 32, 3), dtype=np.float32)
    y_np = rng.integers(0, 10, b).astype(np.int32)
    x_ntk = rng.random((max(ntk_ns, default=BLOCK), 32, 32, 3), dtype=np.float32)
    init, _ = models.get_model("resnet18", 10, 64)
    params0, net_state0 = random_variables(init, (b, 32, 32, 3), seed=args.seed)
    params0 = dict(params0)
    params0["res_net18/~/logits"] = {k: jnp.asarray(0.01 * rng.standard_normal(v.shape), v.dtype)
                                     for k, v in params0["res_net18/~/logits"].items()}
    return params0, net_state0, x_np, y_np, x_ntk


def interleaved_rounds(args, keys, ref, ours):
    """`--rounds` rounds; in each, every path is timed on both sides, the side that goes first
    alternating. Returns, per path, the wall and CPU seconds of each side, load and order."""
    rec = {k: {"reference": [], "ours": [], "ref_cpu": [], "our_cpu": [], "load": [], "order": []} for k in keys}
    for r in range(args.rounds):
        for k in keys:
            reps = args.repeats if k.startswith("train") else 1
            order = ("reference", "ours") if r % 2 == 0 else ("ours", "reference")
            loads = {}
            for side in order:
                loads[side] = round(os.getloadavg()[0], 2)
                if side == "reference":
                    res = ref.ask(op="time", path=k, repeats=reps)
                    walls, cpus = res["walls"], res["cpus"]
                else:
                    walls, cpus = time_calls(ours[k][1], reps)
                rec[k][side].append(walls)
                rec[k]["ref_cpu" if side == "reference" else "our_cpu"].extend(cpus)
            rec[k]["load"].append([loads["reference"], loads["ours"]])
            rec[k]["order"].append("reference first" if order[0] == "reference" else "ours first")
    return rec


def result_line(args, k, d, warm, ref_versions, mach):
    """The JSON line of one path: both medians, their ratio, per-round figures and loads."""
    import jax
    ref_all = [w for ws in d["reference"] for w in ws]
    our_all = [w for ws in d["ours"] for w in ws]
    ref_round = [statistics.median(ws) for ws in d["reference"]]
    our_round = [statistics.median(ws) for ws in d["ours"]]
    config = {"model": "resnet18", "width": 64, "batch_size": args.batch_size, "data": "random", "seed": args.seed,
              "rounds": args.rounds, "calls_per_round": len(d["ours"][0])}
    if k.startswith("ntk"):
        config.update(n=int(k[3:]), class_index=0)
    if k == "pgd20":
        config.update(eps=EPS, steps=PGD_STEPS, step_size=2 * EPS / PGD_STEPS)
    return {
        "bench": "vs_reference", "path": k, "config": config,
        "reference_s": round(statistics.median(ref_all), 3), "ours_s": round(statistics.median(our_all), 3),
        "speedup": round(statistics.median(ref_all) / statistics.median(our_all), 3),
        "speedup_per_round": [round(a / b, 3) for a, b in zip(ref_round, our_round)],
        "reference_s_per_round": [round(v, 3) for v in ref_round],
        "ours_s_per_round": [round(v, 3) for v in our_round],
        "reference_cpu_s_median": round(statistics.median(d["ref_cpu"]), 2),
        "ours_cpu_s_median": round(statistics.median(d["our_cpu"]), 2),
        "loadavg_1min_per_round_ref_ours": d["load"], "order_per_round": d["order"],
        "warmup_s": {s: round(v, 1) for s, v in warm.items()},
        "reference_stack": ref_versions,
        "ours_stack": {"jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "machine": mach,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, os.path.dirname(HERE))
    import jax.numpy as jnp

    from common import machine
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"error: unknown --paths {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    ntk_ns = [int(n) for n in args.ntk_n.split(",") if n] if "ntk" in paths else []
    if any(n % BLOCK for n in ntk_ns):
        raise SystemExit(f"error: --ntk_n sizes must be multiples of {BLOCK}")
    params0, net_state0, x_np, y_np, x_ntk = make_inputs(args, ntk_ns)
    tmp = tempfile.mkdtemp(prefix="bench_vs_reference_")
    try:
        inputs = os.path.join(tmp, "inputs.npz")
        _save_inputs(inputs, params0, net_state0, x_np, y_np, x_ntk)
        stub_nt = subprocess.run([args.ref_python, "-c", "import neural_tangents"], capture_output=True).returncode != 0
        code = prepare_reference(os.path.abspath(args.ref_code), os.path.join(tmp, "reference"), stub_nt)
        ref = Reference(args.ref_python, code, inputs, ntk_ns)
        ours = our_paths(params0, net_state0, jnp.asarray(x_np), jnp.asarray(y_np), x_ntk, ntk_ns)
        keys = [p for p in paths if p != "ntk"] + [f"ntk{n}" for n in ntk_ns]
        if stub_nt and ntk_ns:
            print(json.dumps({"note": "the reference's Python has no neural_tangents: ntk skipped"}), flush=True)
            keys = [k for k in keys if not k.startswith("ntk")]
        warm = {}
        for k in keys:  # compile everything before any timing
            warm[k] = {"reference": ref.ask(op="warm", path=k)["warmup_s"]}
            t = time.perf_counter()
            ours[k][0]()
            warm[k]["ours"] = time.perf_counter() - t
        rec = interleaved_rounds(args, keys, ref, ours)
        ref.close()
        mach = machine()
        for k in keys:
            print(json.dumps(result_line(args, k, rec[k], warm[k], ref.versions, mach)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
