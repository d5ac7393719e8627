"""Where the time of `demo.sh` goes, step by step: wall, CPU (user + system) and peak memory of
every Python process the demo starts, and how much of it is XLA compilation (misses of the
persistent compilation cache) against cache hits and execution.

    python bench/bench_demo.py --out /tmp/demo_run --cache /tmp/demo_cache [--quick] [--clear_cache]

runs `bash demo.sh` with DEMO_OUT=--out and NTK_JAX_CACHE_DIR=--cache (an empty or new folder
gives a cold run; the same folder again a warm one), every Python step wrapped by this file
(`--wrap`), then prints one JSON line per step and a markdown table, and appends them to
--out/profile.jsonl. CPU seconds are the load-robust figure on a shared machine; every line
records the 1-minute load average at the start of its step.

`python bench/bench_demo.py --wrap SCRIPT ARGS...` runs one script under the same accounting
(JSON line appended to $DEMO_PROFILE), e.g. to time a single step while iterating.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import time

from timing import cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _wrap(argv):
    """Run `argv` (a script and its arguments, or '-' for stdin) as __main__, recording JAX's
    compile events, then append one JSON line to $DEMO_PROFILE."""
    t0 = time.time()
    load = os.getloadavg()[0]
    stats = collections.Counter()
    per_fn = collections.Counter()
    last_hit = [False]

    def on_event(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            last_hit[0] = True

    def on_duration(event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            if last_hit[0]:
                stats["cache_hits"] += 1
                stats["cache_hit_s"] += secs
            else:
                stats["compiles"] += 1
                stats["compile_s"] += secs
                per_fn[kw.get("fun_name", "?")] += secs
            last_hit[0] = False
        elif event == "/jax/core/compile/jaxpr_trace_duration":
            stats["trace_s"] += secs
        elif event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            stats["lower_s"] += secs

    def report():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        rc = resource.getrusage(resource.RUSAGE_CHILDREN)
        rec = {"step": os.environ.get("DEMO_STEP") or _label(argv),
               "wall_s": round(time.time() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime + rc.ru_utime
                                                                    + rc.ru_stime, 1),
               "user_s": round(ru.ru_utime + rc.ru_utime, 1), "sys_s": round(ru.ru_stime + rc.ru_stime, 1),
               "maxrss_mb": round(ru.ru_maxrss / 1024), "load1_start": round(load, 2),
               **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in stats.items()},
               "top_compiles": [[k, round(v, 1)] for k, v in per_fn.most_common(6)],
               "argv": argv}
        path = os.environ.get("DEMO_PROFILE")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        else:
            print(json.dumps(rec), file=sys.stderr)

    import atexit
    atexit.register(report)
    if argv[0] != "-":
        from jax import monitoring
        from jax._src import compiler
        monitoring.register_event_listener(on_event)
        monitoring.register_event_duration_secs_listener(on_duration)
        original = getattr(compiler, "compile_or_get_cached", None)  # JAX internals: CPU seconds only if present

        def timed(*a, **kw):  # process CPU seconds (all threads) of each compilation or cache read
            c0 = time.process_time()
            try:
                return original(*a, **kw)
            finally:
                stats["cache_hit_cpu_s" if last_hit[0] else "compile_cpu_s"] += time.process_time() - c0
        if original is not None:
            compiler.compile_or_get_cached = timed
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    else:
        sys.argv = list(argv)
        exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})


def _label(argv):
    """A short name of one demo step: the script and what it works on."""
    if argv[0] == "-":
        return "table"
    name = os.path.basename(argv[0]).replace(".py", "")
    opts = {k: v for k, v in zip(argv[1:], argv[2:]) if k.startswith("--")}
    if name == "analyze_ntk":
        return f"{name} {argv[1]} {os.path.basename(opts.get('--out_dir', ''))}".strip()
    if name == "run_exp":
        return f"{name} {os.path.basename(opts.get('--save_path', ''))}"
    if name == "eval_and_make_adv":
        what = os.path.basename(os.path.dirname(opts.get("--model_path", "")))
        return f"eval {what} {opts.get('--save_name', '')}".strip()
    return name


def _table(records):
    cols = ("step", "wall_s", "cpu_s", "compiles", "compile_s", "compile_cpu_s", "trace_s", "cache_hits",
            "cache_hit_s", "maxrss_mb", "load1_start")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(str(r.get(c, 0)) for c in cols) + " |")
    tot = {c: round(sum(r.get(c, 0) for r in records), 1) for c in cols[1:-2]}
    lines.append("| total | " + " | ".join(str(tot[c]) for c in cols[1:-2]) + " | "
                 + str(max(r.get("maxrss_mb", 0) for r in records)) + " | |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap":
        return _wrap(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="DEMO_OUT of the run (its profile.jsonl is written there)")
    p.add_argument("--cache", required=True, help="NTK_JAX_CACHE_DIR of the run (empty = cold)")
    p.add_argument("--clear_cache", action="store_true", help="empty --cache first (a cold run)")
    p.add_argument("--quick", action="store_true", help="DEMO_QUICK=1")
    a = p.parse_args()
    if a.clear_cache and os.path.isdir(a.cache):
        shutil.rmtree(a.cache)
    os.makedirs(a.out, exist_ok=True)
    prof = os.path.join(a.out, "profile.jsonl")
    if os.path.exists(prof):
        os.unlink(prof)
    env = dict(os.environ, DEMO_OUT=a.out, NTK_JAX_CACHE_DIR=a.cache, DEMO_PROFILE=prof,
               PYTHON=f"{sys.executable} {os.path.abspath(__file__)} --wrap", DEMO_QUICK="1" if a.quick else "0")
    load = os.getloadavg()[0]
    t0 = time.time()
    r = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env)
    wall = time.time() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    records = [json.loads(line) for line in open(prof)] if os.path.exists(prof) else []
    summary = {"step": "demo.sh", "quick": a.quick, "rc": r.returncode, "wall_s": round(wall, 1),
               "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "user_s": round(ru.ru_utime, 1),
               "sys_s": round(ru.ru_stime, 1), "maxrss_mb": round(ru.ru_maxrss / 1024),
               "load1_start": round(load, 2), "load1_end": round(os.getloadavg()[0], 2),
               "cpu": cpu_model(), "cores": os.cpu_count()}
    with open(prof, "a") as f:
        f.write(json.dumps(summary) + "\n")
    print()
    for rec in records:
        print(json.dumps({k: v for k, v in rec.items() if k != "argv"}))
    print(json.dumps(summary))
    print()
    print(_table(records))
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
