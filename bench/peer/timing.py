"""The timing rules of the bench, for the peer: the same loop shapes as bench/shared.ts."""
import math
import re
import time

TARGET_SECONDS = 0.35


def time_per_op(fn, repeats=3):
    """Seconds per call: n calls per timed run, n chosen so that a run takes about 0.35 s, best of `repeats`."""
    fn()  # first-call allocations and kernel selection stay out of the timing
    start = time.perf_counter()
    fn()
    single = time.perf_counter() - start
    n = max(2, min(1000, round(TARGET_SECONDS / max(single, 1e-5))))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best, n


def time_calls(fn, count):
    """Seconds of each of `count` calls."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mib():
    """VmHWM of this process, as the bench reads it for ours."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) / 1024 if match else None
    except OSError:
        return None
