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

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import metrics as client_metrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


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
