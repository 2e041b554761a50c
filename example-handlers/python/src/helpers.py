"""gaspard's Python bridge: how exceptions are told in gaspard's log.

Compiled into libgaspar_python.so and run in each worker's interpreter as the
module _gaspard_bridge. Nothing here may raise: the Rust side calls these
functions while it handles a failure already.
"""

import sys
import traceback


def _innermost(tb):
    """The innermost frame of a traceback outside the import machinery."""
    last = None
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
            last = tb
        tb = tb.tb_next
    return last


def describe(exc, limit):
    """One line: the exception's type, its message cut to `limit`
    characters, and where it was raised."""
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    try:
        if isinstance(exc, SyntaxError) and exc.filename is not None:
            text = f"{exc.msg} ({exc.filename}, line {exc.lineno})"
        else:
            text = str(exc)
    except BaseException:
        text = "(unprintable)"
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    where = ""
    last = None if isinstance(exc, SyntaxError) else _innermost(exc.__traceback__)
    if last is not None:
        code = last.tb_frame.f_code
        where = f" (at {code.co_filename}:{last.tb_lineno} in {code.co_name})"
    return f"{name}: {text}{where}" if text else f"{name}{where}"


def traceback_lines(exc, frames, limit):
    """The traceback as lines: at most the `frames` innermost frames of each
    exception in the chain, and at most the last `limit` characters."""
    try:
        text = "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-frames)
        )
    except BaseException:
        return ["(the traceback could not be formatted)"]
    if len(text) > limit:
        text = "(traceback cut to its last %d characters)\n...%s" % (limit, text[-limit:])
    return text.rstrip("\n").splitlines()


def exit_status(exc):
    """The status a SystemExit asks for, as `python` would exit with it."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def flush():
    """Writes out what print() buffered: the worker never finalises Python."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
