"""A process's metrics in the text format, written without going through every sample.

`generate_latest` builds each sample anew at every scrape: its labels as a dict, sorted,
each name checked and each value escaped, then formatted. For a labelled counter that is
done for every label set ever seen, twice (`_total` and `_created`): with 1,000 teams that
have each sent a request, 12,000 lines and about 100 ms of the event loop every scrape,
during which no request moves. A label set never changes once made, and neither does its
`_created` value, so `CounterText` writes each child's label text and `_created` line
once, and at a scrape only the values that changed. `RegistryText` writes the other
metrics (histograms, gauges: a few label sets each) through `generate_latest`, in the
registry's order. The output is byte for byte `generate_latest`'s (a test holds it so).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from prometheus_client import metrics as client_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy.core.models import NANOS_PER_USD


def escape_value(value: str) -> str:
    """A label value as the text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    """`{a="x",b="y"}`: the labels sorted by name, values escaped, as `generate_latest`."""
    pairs = sorted(zip(names, values, strict=True))
    return "{" + ",".join(f'{n}="{escape_value(v)}"' for n, v in pairs) + "}"


def _help(name: str, documentation: str) -> str:
    return "# HELP {} {}\n".format(name, documentation.replace("\\", r"\\").replace("\n", r"\n"))


class CounterText:
    """The text of one labelled counter (`labelnames` not empty), remembered child by child.

    Reads the counter's children and their values through prometheus-client's attributes
    (`_metrics`, `_lock`, `_value`, `_created`), as its own `collect` does; the test against
    `generate_latest` is what keeps that honest across versions."""

    __slots__ = ("_counter", "_created_head", "_head", "_lines", "_name")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._name = counter._name
        doc = counter._documentation
        total, created = f"{self._name}_total", f"{self._name}_created"
        self._head = _help(total, doc) + f"# TYPE {total} counter\n"
        self._created_head = _help(created, doc) + f"# TYPE {created} gauge\n"
        # Each child (by identity, as its label values map to it): its label text, its
        # `_created` line, and its last value with the `_total` line written for it.
        self._lines: dict[tuple[str, ...], tuple[object, str, str, float, str]] = {}

    def write(self, out: list[str]) -> None:
        counter = self._counter
        with counter._lock:
            children: dict[tuple[str, ...], Any] = dict(counter._metrics)  # type: ignore[arg-type]
        out.append(self._head)
        created: list[str] = []
        use_created = client_metrics._use_created
        for values, child in children.items():
            known = self._lines.get(values)
            if known is None or known[0] is not child:
                labels = label_text(counter._labelnames, values)
                stamp = floatToGoString(child._created)  # type: ignore[no-untyped-call]
                known = (child, labels, f"{self._name}_created{labels} {stamp}\n", -1.0, "")
            value = child._value.get()
            if value != known[3] or not known[4]:
                number = floatToGoString(value)  # type: ignore[no-untyped-call]
                known = (*known[:3], value, f"{self._name}_total{known[1]} {number}\n")
                self._lines[values] = known
            out.append(known[4])
            if use_created:
                created.append(known[2])
        if created:
            out.append(self._created_head)
            out.extend(created)


class RegistryText:
    """The text of `collectors`, in their order: labelled counters by `CounterText`, any
    other collector by `generate_latest` (over a registry of its own, made once)."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._parts: list[CounterText | CollectorRegistry] = []
        for collector in collectors:
            if isinstance(collector, Counter) and collector._labelnames:
                self._parts.append(CounterText(collector))
            else:
                alone = CollectorRegistry(auto_describe=False)
                alone.register(collector)
                self._parts.append(alone)

    def text(self) -> bytes:
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, CounterText):
                part.write(out)
            else:
                out.append(generate_latest(part).decode())
        return "".join(out).encode()


class MultiprocessText:
    """Every worker's values in the text format (prometheus-client's multiprocess mode).

    `MultiProcessCollector` parses each series' key and builds a sample for it in every
    worker's file, then `generate_latest` writes each: about 180 ms a scrape for 1,000
    teams that have each sent a request. Counters, which hold nearly every series, are
    summed here by their key as written (the same text in every worker's file), and each
    key's name and label text are parsed once in the process's life. The other files
    (the in-flight gauges, the upstream latency histogram: a few series) go through the
    client's own collector. Counters come first, then the rest; within a family the
    series are those `generate_latest` writes, with the same values (a test parses both).
    """

    def __init__(self, path: str, exact: frozenset[str] = frozenset()) -> None:
        self._path = path
        self._exact = exact
        """The families of dollars, which each worker keeps to the nano: their series are
        summed in nanos, not as floats (two workers' $0.032 and $0.02 are $0.052)."""
        # A series' key → (family, the sample's line up to its value, help).
        self._keys: dict[str, tuple[str, str, str]] = {}

    def _parsed(self, key: str) -> tuple[str, str, str]:
        found = self._keys.get(key)
        if found is None:
            family, name, labels, doc = json.loads(key)
            text = label_text(list(labels), list(labels.values())) if labels else ""
            found = self._keys[key] = (family, f"{name}{text} ", doc)
        return found

    def text(self) -> bytes:
        files = _living(self._path, glob.glob(os.path.join(self._path, "*.db")))
        counters = [f for f in files if os.path.basename(f).startswith("counter_")]
        summed: dict[str, float] = {}
        for file in counters:
            for key, value, _, _ in MmapedDict.read_all_values_from_file(file):  # type: ignore[no-untyped-call]
                if self._parsed(key)[0] in self._exact:
                    value = round(value * NANOS_PER_USD)  # summed as an integer of nanos
                summed[key] = summed.get(key, 0) + value
        families: dict[str, list[str]] = {}
        docs: dict[str, str] = {}
        for key, value in summed.items():
            if isinstance(value, int):
                value = value / NANOS_PER_USD
            family, line, doc = self._parsed(key)
            lines = families.get(family)
            if lines is None:
                lines = families[family] = []
                docs[family] = doc
            lines.append(f"{line}{floatToGoString(value)}\n")  # type: ignore[no-untyped-call]
        out: list[str] = []
        for family, lines in families.items():
            total = f"{family}_total"
            out.append(_help(total, docs[family]) + f"# TYPE {total} counter\n")
            out.extend(lines)
        others = CollectorRegistry(auto_describe=False)
        summed_files = set(counters)
        others.register(_Merged([f for f in files if f not in summed_files]))
        out.append(generate_latest(others).decode())
        return "".join(out).encode()


LIVE_GAUGE = re.compile(r"gauge_live[a-z]+_([0-9]+)\.db", re.ASCII)
"""A worker's file of `live*` gauges (in-flight requests and body bytes), named by its pid."""


def _living(path: str, files: list[str]) -> list[str]:
    """`files` but the live gauges of workers that are gone. A worker that is killed
    (uvicorn starts another) never marks itself dead: its in-flight requests would be
    counted forever. Its counters stay, as what it did was done."""
    gone = set()
    for file in files:
        found = LIVE_GAUGE.fullmatch(os.path.basename(file))
        if found and not pid_alive(int(found[1])):
            gone.add(file)
            multiprocess.mark_process_dead(int(found[1]), path)  # type: ignore[no-untyped-call]
    return [f for f in files if f not in gone]


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has `pid`: a worker's, here, and a process registered
    in the ledger, for `proxy.web.housekeeping` (which the metrics may not import)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process has that pid: not ours to judge
    return True


class _Merged(Collector):
    """The client's own merge of some of the workers' files."""

    def __init__(self, files: list[str]) -> None:
        self._files = files

    def collect(self) -> Iterable[Metric]:
        return MultiProcessCollector.merge(self._files, accumulate=True)  # type: ignore[no-any-return,no-untyped-call]
