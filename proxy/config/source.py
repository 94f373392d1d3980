"""YAML files read into plain values that remember the line of every key.

`read_document` keeps, for each JSON path (`("budgets", 1, "limit_usd")`), the
line where it was written, expands `${ENV_VAR}` in string values, and reports
syntax errors and duplicate keys as `file:line: message`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

JsonPath = tuple[str | int, ...]

_MERGE = "tag:yaml.org,2002:merge"
_VALUE = "tag:yaml.org,2002:value"  # the `=` key, which `flatten_mapping` reads as text
_STR = "tag:yaml.org,2002:str"
ALIASED_VALUES = 10_000
"""At most this many values read through aliases in one file: an alias names a node, not
a copy, so nested aliases can stand for billions of values in a few lines (a "billion
laughs"), which reading them out would take minutes and gigabytes to build."""
MAX_DEPTH = 100
"""Levels of nesting a file may have (a configuration needs five)."""
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def dotted(path: JsonPath) -> str:
    """A JSON path as the user reads it: `budgets[1].limit_usd`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass
class Document:
    """One configuration file: its data, the line of every key and list item, and the text
    of every number written with a fraction or an exponent (`written`: a float holds
    about 16 digits, `99999999.999999999` a budget exact to the nano-dollar)."""

    file: str
    data: Any
    lines: dict[JsonPath, int] = field(default_factory=dict)
    written: dict[JsonPath, str] = field(default_factory=dict)

    def line(self, path: JsonPath) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return 1

    def where(self, path: JsonPath) -> str:
        """`file:line` of `path`."""
        return f"{self.file}:{self.line(path)}"

    def problem(self, path: JsonPath, message: str) -> str:
        """`file:line: key.path: message`."""
        prefix = f"{dotted(path)}: " if path else ""
        return f"{self.where(path)}: {prefix}{message}"


def expand_env(text: str, env: Mapping[str, str]) -> str:
    """`${NAME}` replaced by the variable's value; an unset variable gives ''."""
    return _ENV_VAR.sub(lambda m: env.get(m.group(1), ""), text)


def read_document(
    path: Path, file: str, env: Mapping[str, str] | None
) -> tuple[Document | None, list[str]]:
    """The document in `path` (shown as `file` in messages), and the problems found reading it
    (`${NAME}` left as written when `env` is None)."""
    try:
        if stat.S_ISCHR(mode := path.stat().st_mode) or stat.S_ISFIFO(mode):
            # Read, a device (`prices: /dev/zero`) or a pipe without a writer never ends: a
            # reload held its lock forever, and every later reload waited behind it.
            return None, [f"{file}: cannot read: not a regular file"]
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        return None, [f"{file}: cannot read: {exc.strerror or exc}"]
    except UnicodeDecodeError as exc:
        return None, [f"{file}: not UTF-8 text (byte {exc.start})"]
    return parse_document(text, file, env)


def parse_document(
    text: str, file: str, env: Mapping[str, str] | None
) -> tuple[Document | None, list[str]]:
    """The document written in `text`, as `read_document` reads it."""
    try:
        try:
            return _parse(_FastLoader(text), file, env)
        except yaml.YAMLError:
            pass  # said again below, in the words of the pure-Python parser
        return _parse(_Loader(text), file, env)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = exc.problem or exc.context or "invalid YAML"
        return None, [f"{file}:{line}: YAML syntax error: {detail}"]
    except yaml.YAMLError as exc:
        return None, [f"{file}:1: YAML error: {exc}"]
    except RecursionError:
        # PyYAML composes a node's children by recursion: some hundreds of nested `[`
        # exhausted the stack, and `check` ended in a traceback.
        return None, [f"{file}:1: YAML error: nesting too deep (more than {MAX_DEPTH} levels)"]


def _parse(
    loader: yaml.SafeLoader, file: str, env: Mapping[str, str] | None
) -> tuple[Document | None, list[str]]:
    """`parse_document` with `loader`, raising its YAMLError."""
    reader = _Reader(loader, file, env)
    try:
        node = loader.get_single_node()
        doc = Document(file, None, written=reader.written)
        if node is not None:
            doc.lines[()] = node.start_mark.line + 1
            doc.data = reader.value(node, (), doc.lines)
    except _TooManyAliased as exc:
        return None, [str(exc)]
    finally:
        loader.dispose()
    return doc, reader.problems


class _TooManyAliased(Exception):
    """A file whose aliases stand for more than `ALIASED_VALUES` values: its problem."""


@functools.lru_cache(maxsize=4096)
def _plain_tag(value: str) -> str:
    """The tag YAML 1.1 gives a plain scalar written `value` (`yaml.SafeLoader.resolve`'s
    answer, which depends on nothing else): kept, as a configuration writes the same
    keys and values in every file (1,000 team files: 27,500 lookups, 3,200 distinct)."""
    tag: str = _RESOLVER.resolve(ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    return tag


_RESOLVER = yaml.resolver.Resolver()  # the resolver of SafeLoader and CSafeLoader


_DEFAULT_TAGS: dict[type[Node], str] = {
    ScalarNode: _STR,
    SequenceNode: "tag:yaml.org,2002:seq",
    MappingNode: "tag:yaml.org,2002:map",
}


class _CachedResolver:
    """A loader's resolver that answers plain scalars from `_plain_tag`, and every other
    node with its kind's default tag (the answer of a resolver with no path resolvers,
    SafeLoader's, without its steps: it is asked once per node)."""

    def resolve(self, kind: type[Node], value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0]:
            return _plain_tag(value)
        if not self.yaml_path_resolvers:  # type: ignore[attr-defined]
            return _DEFAULT_TAGS[kind]
        tag: str = super().resolve(kind, value, implicit)  # type: ignore[misc]
        return tag


class _Loader(_CachedResolver, yaml.SafeLoader):
    pass


class _FastLoader(_CachedResolver, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser where PyYAML has it: ten times the pure-Python one's speed (1,000
    team files: 3.8 s of a reload), the same nodes and marks. Its messages differ: a file
    it cannot parse is parsed again by `_Loader`, whose messages the user gets."""


class _Reader:
    def __init__(self, loader: yaml.SafeLoader, file: str, env: Mapping[str, str] | None) -> None:
        self.loader = loader
        self.file = file
        self.env = env
        self.problems: list[str] = []
        self.written: dict[JsonPath, str] = {}  # the text of each float, by path
        self._read: set[int] = set()  # the collection nodes read so far, by identity
        self._aliased = 0  # values read again through an alias

    def _problem(self, line: int, path: JsonPath, message: str) -> str:
        return f"{self.file}:{line}: {dotted(path) + ': ' if path else ''}{message}"

    def value(
        self, node: Node, path: JsonPath, lines: dict[JsonPath, int], aliased: bool = False
    ) -> Any:
        if len(path) > MAX_DEPTH:  # a recursive alias would never end
            raise yaml.YAMLError("nesting too deep (recursive alias?)")
        if isinstance(node, (MappingNode, SequenceNode)):
            # A node read a second time is reached through an alias, as is all below it.
            aliased = aliased or id(node) in self._read
            self._read.add(id(node))
        if aliased:
            self._aliased += 1
            if self._aliased > ALIASED_VALUES:
                raise _TooManyAliased(
                    self._problem(
                        node.start_mark.line + 1,
                        path,
                        f"the file's aliases stand for more than {ALIASED_VALUES:,} values: "
                        "write them out, or use fewer aliases",
                    )
                )
        if isinstance(node, MappingNode):
            tags = [key_node.tag for key_node, _ in node.value]
            merged = 0
            if _MERGE in tags or _VALUE in tags:
                explicit = len(tags) - tags.count(_MERGE)
                self.loader.flatten_mapping(node)  # resolves `<<` merge keys, placed first
                merged = len(node.value) - explicit
            result: dict[str, Any] = {}
            written: set[str] = set()  # keys written out here, not merged in with `<<`
            for index, (key_node, value_node) in enumerate(node.value):
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, ScalarNode):
                    self.problems.append(self._problem(line, path, "keys must be text"))
                    continue
                key = self._scalar(key_node)
                key = key if isinstance(key, str) else str(key)
                key_path = (*path, key)
                if index >= merged:
                    if key in written:
                        self.problems.append(self._problem(line, key_path, "duplicate key"))
                    written.add(key)
                lines[key_path] = line
                leaf = value_node.__class__ is ScalarNode and not aliased
                if leaf and len(key_path) <= MAX_DEPTH:
                    # What `value` does, one call fewer.
                    result[key] = self._leaf(value_node, key_path)
                else:
                    result[key] = self.value(value_node, key_path, lines, aliased)
            return result
        if isinstance(node, SequenceNode):
            items = []
            for index, item in enumerate(node.value):
                item_path = (*path, index)
                lines[item_path] = item.start_mark.line + 1
                if item.__class__ is ScalarNode and not aliased and len(item_path) <= MAX_DEPTH:
                    items.append(self._leaf(item, item_path))
                else:
                    items.append(self.value(item, item_path, lines, aliased))
            return items
        return self._leaf(node, path)

    def _leaf(self, node: Node, path: JsonPath) -> Any:
        scalar = self._scalar(node)
        if isinstance(scalar, str):
            if self.env is None or "${" not in scalar:
                return scalar
            if _unread_reference(scalar):
                self._refuse(node, path, UNREAD_REFERENCE)
            return expand_env(scalar, self.env)
        if node.tag in _NUMBERS:
            ambiguous = _ambiguous_number(node.value)
            if ambiguous is not None:
                self._refuse(node, path, ambiguous)
            elif isinstance(scalar, float):
                self.written[path] = node.value
        if isinstance(scalar, float) and not math.isfinite(scalar):
            return str(node.value)  # .inf and .nan are no amounts; the schema says so
        return scalar

    def _refuse(self, node: Node, path: JsonPath, message: str) -> None:
        self.problems.append(self._problem(node.start_mark.line + 1, path, message))

    def _scalar(self, node: Node) -> Any:
        if node.tag == _STR:  # what `construct_object` gives a string, without its checks
            return node.value
        if node.tag in _IMMUTABLE:
            return _immutable(node.tag, node.value)
        return self.loader.construct_object(node)


_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_IMMUTABLE = frozenset(f"tag:yaml.org,2002:{name}" for name in ("int", "float", "bool", "null"))


@functools.lru_cache(maxsize=4096)
def _immutable(tag: str, value: str) -> Any:
    """The number, boolean or null a scalar tagged `tag` and written `value` stands for, as
    SafeLoader constructs it: kept, as the same few are written in every team file (a
    value of these kinds is immutable: one object may stand for all its nodes). A number
    of more digits than Python reads (4,300) stays text, which no setting takes."""
    node = ScalarNode(tag, value)
    try:
        return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)
    except ValueError:
        return value


_NUMBERS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_OCTAL = re.compile(r"[-+]?0[0-7_]+")
UNREAD_REFERENCE = (
    "holds a `${` that begins no variable reference: write ${NAME} (letters, digits and "
    "'_'; no default such as ${NAME:-value}, no nesting)"
)
"""Not shown: the text may be a secret's (`admin_token: ${TOKEN:-s3cret}`)."""


@functools.lru_cache(maxsize=4096)
def _ambiguous_number(text: str) -> str | None:
    """Why a number written `text` may not say what its writer meant, or None: YAML 1.1,
    which Tollgate reads, takes `0100` for octal 64 and `1:30` for 90 (base 60), where
    YAML 1.2 (editors checking a file against `tollgate schema`) and people read 100
    and the text '1:30'."""
    if ":" in text:
        value = _immutable("tag:yaml.org,2002:int", text) if "." not in text else None
        shown = f" ({value})" if value is not None else ""
        return (
            f"{text} is a base-60 number{shown} in YAML 1.1: write the number it stands "
            "for, or quote it if it is text"
        )
    if _OCTAL.fullmatch(text):
        octal = _immutable("tag:yaml.org,2002:int", text)
        decimal = int(text.replace("_", ""), 10)
        if octal != decimal:
            return (
                f"{text} is the octal number {octal} in YAML 1.1, the decimal {decimal} in "
                "YAML 1.2: write it without the leading zero, or quote it if it is text"
            )
    return None


def _unread_reference(text: str) -> bool:
    """Whether a `${` in `text` begins no `${NAME}` (kept as written, it would reach a
    setting as text: a URL, a key or a token that is literally `${KEY:-default}`)."""
    start = text.find("${")
    while start != -1:
        found = _ENV_VAR.match(text, start)
        if found is None:
            return True
        start = text.find("${", found.end())
    return False


def flow_scalar(text: str) -> str:
    """`text` as it can be written in a YAML flow mapping and read back as itself: as is
    when it can, else double-quoted (a JSON string is a YAML double-quoted scalar)."""
    try:
        if yaml.safe_load(f"{{id: {text}}}") == {"id": text}:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)
