"""Timing loop and machine name shared by the benchmarks, standard library only: it is imported
before JAX starts (bench_train.py sets XLA_FLAGS first) and under the reference's own Python
(bench_vs_reference.py's worker, which must not import this project's modules; bench_conv.py)."""
import platform
import time


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else platform.processor(), else 'unknown'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_calls(fn, repeats):
    """Call fn() `repeats` times (fn must block until its work is done). Returns (wall seconds,
    process-CPU seconds: all threads, steadier than wall time on a shared machine), one per call."""
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return walls, cpus
