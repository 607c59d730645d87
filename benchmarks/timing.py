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


def timed_interleaved(fns, sync, repeat):
    """name -> fastest of `repeat` runs, the functions taking turns (one warm-up each first).

    On a shared machine the load changes from second to second: timing one contender's runs and then
    the next's lets a change fall between them and skew their ratio; taking turns exposes all of them
    to the same conditions, and each keeps its least disturbed run."""
    for fn in fns.values():
        fn()
    sync()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
