"""The timer the benchmark scripts share."""

import time


def timed(fn, sync, repeat):
    """Fastest of `repeat` runs after one warm-up (the least disturbed by other load on a shared machine)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)
