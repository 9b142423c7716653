"""One OpenMP team per process: the engine loop's.

torch's CPU kernels run on OpenMP (the GNU runtime, ``libgomp``, in the Linux wheels), and
every thread that runs a parallel kernel gets a team of worker threads of its own, kept for
the thread's lifetime. libgomp lets idle workers spin (a few ms) only while it manages no more
threads than the machine has CPUs; past that, every barrier of every team goes to sleep in the
kernel and each of a forward's few hundred small kernels pays a wake-up. So once the model
has been loaded on one thread (its team stays) and the engine loop steps it on another, both
are slow. Measured on a 2-core AMD EPYC, SmolLM2-135M in bf16 (the batch-invariant forward),
600-token context, medians of 25: a one-token decode took 49 ms on the loading thread and
66-91 ms on a second thread; 8 rows x 1 token 82-88 against 117-129 ms. Releasing the loading
thread's team (``omp_pause_resource_all``) brought the second thread back to 49 / 88 ms.

:func:`release_team` frees the calling thread's team; the engine loop calls it on the threads
that build it and hand it work, so the loop's thread is the one that keeps a team. A thread
that later runs a parallel kernel again simply gets a new team.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

# the OpenMP runtimes torch may be linked with, by the file names they load under
_RUNTIMES = ("libgomp", "libomp", "libiomp5")
_OMP_PAUSE_SOFT = 1


@lru_cache(maxsize=1)
def _pause_fn() -> Any:
    """``omp_pause_resource_all`` of the OpenMP runtime loaded with torch, or None."""
    import torch  # noqa: F401 - loads the runtime this looks for

    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "/" in line]
    except OSError:          # not Linux: leave the runtime's defaults alone
        return None
    for path in dict.fromkeys(paths):
        name = path.rsplit("/", 1)[-1]
        if any(name.startswith(r) for r in _RUNTIMES):
            try:
                fn = ctypes.CDLL(path).omp_pause_resource_all
            except (OSError, AttributeError):
                continue
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            log.debug("OpenMP runtime: %s", path)
            return fn
    return None


def release_team() -> bool:
    """Free the calling thread's OpenMP worker threads; True when the runtime did so (or the
    thread had none), False when no runtime with ``omp_pause_resource_all`` is loaded or the
    thread is inside a parallel region."""
    fn = _pause_fn()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0
