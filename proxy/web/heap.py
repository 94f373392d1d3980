"""A serving process's long-lived heap, set aside from the cyclic garbage collector.

Once a process has started (modules imported, configuration built, ledger and upstream
open) it holds tens of thousands of objects that live as long as it does. CPython's
collector walks all of them again at every collection of its oldest generation, with
the event loop stopped meanwhile: 30 to 60 ms for a small configuration, measured under
load, more as the configuration grows. `settle` collects once, then moves what is left
to the permanent generation (`gc.freeze`), which no collection walks: only what requests
allocate is walked after that.

A frozen object that later becomes garbage in a reference cycle is never collected; what
start-up builds and a reload replaces (the configuration, a runtime) is freed by
reference counting, which freezing leaves alone (`tests/test_heap.py` checks it).
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Start-up is over: collect its garbage, then set the rest aside for good."""
    gc.collect()
    gc.freeze()
