"""Timing loops shared by the benchmarks, standard library only: bench_vs_reference.py also runs
it under the reference's own Python, which must not import this project's modules."""
import time


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
