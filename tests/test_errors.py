"""The one exception tree: everything Tollgate raises is in it, drawn in its docstring, and
every RequestError is answered in OpenAI's error shape by the one mapping of the web layer."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import json
import logging
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from starlette.exceptions import HTTPException

import proxy
from proxy.core import errors
from proxy.core.errors import (
    InternalError,
    MethodNotAllowed,
    RateLimited,
    RequestError,
    TollgateError,
)
from proxy.web.responses import as_request_error, error_response

PACKAGE = Path(proxy.__file__).parent
SIMULATOR = "proxy.simulator"
"""Left out: it stands in for OpenAI, so its errors are the upstream's, not Tollgate's."""

OUTSIDE_THE_TREE = {
    # Private control flow, caught in the module that raises it.
    ("proxy.ledger.sqlite_connections", "_Busy"): "a busy database, retried in place",
    ("proxy.ledger.sqlite_connections", "_WalFull"): "a WAL past its bound, retried in place",
    ("proxy.ledger.sqlite_connections", "_WalLost"): "a WAL file removed, refused in place",
    ("proxy.core.dimensions", "_Ambiguous"): "why an image is refused, raised as InvalidRequest",
    ("proxy.web.exchange", "_NotHeld"): "a 2xx answer its spool could not hold, charged its "
    "bound and answered 502 where it is caught",
    ("proxy.config.source", "_TooManyAliased"): "a file whose aliases stand for too many "
    "values, made its problem",
    ("proxy.web.batch_follow", "OutputGone"): "a batch's output file deleted unread, its "
    "lines then charged their bounds",
    ("proxy.web.batch_follow", "OutputUnreadable"): "a batch's output file unreadable past a "
    "point, the lines not read then charged their bounds",
    # Python's and libraries' own, on purpose.
    ("proxy.upstream", "UnaskedAnswer"): "an aiohttp error raised inside its session, "
    "translated at the boundary as its others are (a 502 never billed)",
    ("proxy.core.metering", "ValueError"): "how json's hooks refuse a document",
    ("proxy.core.parsing", "ValueError"): "how json's hooks refuse a document",
    ("proxy.core.pricing", "ValueError"): "a size that is not explicit (a caller's mistake)",
    ("proxy.core.price_entries", "ValueError"): "a malformed price entry (made a ConfigError)",
    ("proxy.core.price_entries", "EntryError"): "a malformed price entry naming its key at "
    "fault (a ValueError, made a ConfigError at that key's line)",
    ("proxy.config.source", "YAMLError"): "a YAML problem, made a ConfigError by the loader",
    ("proxy.web.exchange", "TimeoutError"): "asyncio's, caught where it is raised",
    (
        "proxy.web.deadline",
        "TimeoutError",
    ): "raised where asyncio.timeout would, caught by its reader",
    ("proxy.ledger.postgres_pool", "AssertionError"): "after a loop that returns or raises",
    ("proxy.__main__", "SystemExit"): "the exit status of the command line",
    ("proxy.cli.options", "ArgumentTypeError"): "how a flag's type tells argparse it is out "
    "of range (a usage error, exit 2)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name != "proxy.__main__" and not name.startswith(SIMULATOR):
            found[name] = ast.parse(path.read_text(), str(path))
    return found


SOURCES = sources()


def resolve(module: ModuleType, node: ast.expr) -> object | None:
    """What the name or dotted name `node` stands for at the top of `module` (None for a
    local variable)."""
    if isinstance(node, ast.Name):
        return getattr(module, node.id, getattr(builtins, node.id, None))
    if isinstance(node, ast.Attribute):
        base = resolve(module, node.value)
        return None if base is None else getattr(base, node.attr, None)
    return None


def exception_class(found: object) -> type[BaseException] | None:
    """`found` if it is an exception class; the return type of a function that makes one."""
    if inspect.isclass(found) and issubclass(found, BaseException):
        return found
    if inspect.isfunction(found):
        returned = typing.get_type_hints(found).get("return")
        for option in typing.get_args(returned) or (returned,):
            if inspect.isclass(option) and issubclass(option, BaseException):
                return option
    return None


def raised_and_defined() -> Iterator[tuple[str, str, type[BaseException]]]:
    """(module, name as written, class) of every exception raised by name or made by a
    function named in a `raise`, and of every exception class defined, across `proxy`."""
    for name, tree in SOURCES.items():
        module = importlib.import_module(name)
        for node in ast.walk(tree):
            written: ast.expr | None = None
            if isinstance(node, ast.Raise) and node.exc is not None:
                written = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            elif isinstance(node, ast.ClassDef):
                written = ast.Name(node.name)
            if written is None:
                continue
            found = exception_class(resolve(module, written))
            if found is not None:
                yield name, ast.unparse(written).rpartition(".")[2], found


FOUND = list(raised_and_defined())


def test_every_exception_tollgate_raises_or_defines_is_in_the_tree() -> None:
    outside = {
        (module, written)
        for module, written, found in FOUND
        if not issubclass(found, TollgateError)
    }
    assert outside - set(OUTSIDE_THE_TREE) == set()


def test_every_exception_left_outside_the_tree_is_still_raised_there() -> None:
    outside = {(m, w) for m, w, found in FOUND if not issubclass(found, TollgateError)}
    assert set(OUTSIDE_THE_TREE) - {("proxy.__main__", "SystemExit")} <= outside


@pytest.mark.parametrize(
    "private", sorted(w for _, w in OUTSIDE_THE_TREE if w.startswith("_")), ids=str
)
def test_a_private_exception_never_leaves_its_module(private: str) -> None:
    homes = {m for (m, w) in OUTSIDE_THE_TREE if w == private}
    mentioned = {
        name
        for name, tree in SOURCES.items()
        for node in ast.walk(tree)
        if (isinstance(node, ast.Name) and node.id == private)
        or (isinstance(node, ast.alias) and node.name == private)
    }
    assert mentioned == homes


def test_the_check_finds_raises_of_every_form() -> None:
    found = {(m, w) for m, w, _ in FOUND}
    assert ("proxy.core.budgets", "BudgetExceeded") in found  # raise X(...)
    assert ("proxy.upstream", "translate") in found  # raise f(...), f returning one
    assert ("proxy.config.source", "YAMLError") in found  # raise module.X(...)
    assert ("proxy.core.errors", "MalformedAnswer") in found  # class X(...)


def every_subclass(cls: type[RequestError]) -> Iterator[type[RequestError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from every_subclass(sub)


REQUEST_ERRORS = sorted(every_subclass(RequestError), key=lambda c: c.__name__)


def example(cls: type[RequestError]) -> RequestError:
    if issubclass(cls, MethodNotAllowed):
        return cls("Invalid method (PUT /metrics).", ("GET", "HEAD"))
    if issubclass(cls, RateLimited):
        headers = {"x-tollgate-ratelimit-remaining-images": "0"}
        return cls(
            "What went wrong, and what to do.", retry_after=7, metric="images", headers=headers
        )
    return cls("What went wrong, and what to do.")


@pytest.mark.parametrize("cls", REQUEST_ERRORS, ids=lambda c: c.__name__)
def test_every_request_error_is_answered_in_openai_shape(cls: type[RequestError]) -> None:
    exc = example(cls)
    assert as_request_error(exc, "POST", "/v1/images/generations") is exc
    answer = error_response(exc, {"x-request-id": "tg_req_1"})
    assert answer.status_code == cls.status
    assert json.loads(bytes(answer.body)) == {
        "error": {"message": exc.message, "type": cls.type, "param": None, "code": cls.code}
    }
    # OpenAI's types; `requests` is that of its own rate limits' 429s.
    types = ("invalid_request_error", "insufficient_quota", "requests", "api_error", "server_error")
    assert cls.type in types
    for name, value in {"x-request-id": "tg_req_1", **exc.headers()}.items():
        assert answer.headers[name] == value


DRAWN = dict(
    (m.group(1), m.group(2))
    for m in re.finditer(r"(\w+)\s+(\d{3} \w+)", errors.__doc__ or "")
)  # fmt: skip


@pytest.mark.parametrize("cls", REQUEST_ERRORS, ids=lambda c: c.__name__)
def test_the_drawing_of_the_tree_shows_each_answer(cls: type[RequestError]) -> None:
    assert cls.__name__ in (errors.__doc__ or "")
    if cls.__name__ in DRAWN:
        assert DRAWN[cls.__name__] == f"{cls.status} {cls.code}"


def test_every_class_of_the_tree_is_drawn() -> None:
    drawn = {c for _, _, c in FOUND if issubclass(c, TollgateError)}
    names = re.findall(r"(?:[├└]── |^    )(\w+)", errors.__doc__ or "", re.MULTILINE)
    assert {c.__name__ for c in drawn} <= set(names)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (HTTPException(404), 404, "not_found"),
        (HTTPException(405, headers={"Allow": "HEAD, GET"}), 405, "method_not_allowed"),
        (HTTPException(400, "Bad request."), 400, "invalid_request"),
    ],
)
def test_starlette_refusals_become_their_openai_equivalents(
    exc: HTTPException, status: int, code: str
) -> None:
    error = as_request_error(exc, "PUT", "/metrics")
    assert (error.status, error.code) == (status, code)
    if isinstance(error, MethodNotAllowed):
        assert error.headers() == {"allow": "GET, HEAD"}


def test_any_other_exception_is_a_logged_500_that_does_not_show_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="tollgate"):
        error = as_request_error(RuntimeError("a secret detail"), "GET", "/admin/budgets")
    assert isinstance(error, InternalError)
    assert "a secret detail" not in error.message
    assert "a secret detail" in caplog.text and "GET /admin/budgets" in caplog.text


def test_the_log_line_of_an_unhandled_error_shows_no_key_a_client_wrote_in_its_path(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A path may hold anything a client wrote in it (a team's key, refused elsewhere); a
    fault's log line shows only its route's words."""
    path = "/v1/responses/tg_live_key_of_another_team_0002/input_items"
    with caplog.at_level(logging.ERROR, logger="tollgate"):
        as_request_error(RuntimeError("boom"), "GET", path)
    assert "tg_live_key" not in caplog.text
    assert "GET /v1/responses/{…}/input_items" in caplog.text
