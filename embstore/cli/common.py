"""Option bundles and error handling shared by every command module."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from embstore.errors import USER_ERRORS, EnvironmentProblem
from embstore.outcome import EXIT_ENVIRONMENT, EXIT_INTERRUPTED, Outcome

store_argument = click.argument("store", type=click.Path(file_okay=False))
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
model_option = click.option(
    "--model", "model", default=None, metavar="NAME",
    help="Model in the store (name, spec or fingerprint prefix); may be omitted when it holds one.",
)

by_option = click.option("--by", type=click.Choice(["speaker", "cluster"]), default="speaker", show_default=True,
                         help="Group by the real speaker label or by the pseudo-speakers of `embstore cluster`.")


EXIT_STATUS_HELP = """
    \b
    Exit status: 0 every selected item done; 3 some items failed (see
    `embstore errors`); 4 stopped on an error of the machine (disk full, a
    missing package); 5 work left (items not extracted yet, or held by another
    run still running); 130 interrupted. Anything but 0 comes with one line
    on stderr saying how many items and why.
"""


def exit_status_documented(fn: Callable) -> Callable:
    """Append the exit statuses to a command's help (put it nearest the function)."""
    fn.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + EXIT_STATUS_HELP
    return fn


def one_line(exc: BaseException) -> click.ClickException:
    """The click error a library error becomes: its one line, exit 1, or exit 4 for an
    `EnvironmentProblem` (the machine's fault: exit 4 has that one name everywhere)."""
    error = click.ClickException(str(exc))
    if isinstance(exc, EnvironmentProblem):
        error.exit_code = EXIT_ENVIRONMENT
    return error


def storage_failure(exc: BaseException) -> str | None:
    """One line for a full or failing disk under the store; None for anything else."""
    import errno
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full: {exc.strerror}; free some space and run the command again"
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "full" in text:
            return f"disk full: SQLite says {text!r}; free some space and run the command again"
        if "disk I/O error" in text:
            return f"cannot write the store: SQLite says {text!r} (disk full or failing?)"
    return None


def library_errors(fn: Callable) -> Callable:
    """Library errors become one-line click errors, never tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command to continue", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except USER_ERRORS as exc:
            raise one_line(exc) from None
        except Exception as exc:
            message = storage_failure(exc)
            if message is None:
                raise
            # a full or failing disk is the machine's problem like any other
            raise one_line(EnvironmentProblem(message)) from None

    return wrapper


def open_store(path: str, create: bool = False) -> Any:
    """The store at `path` (a `embstore.store.Store`); imported on use so `--help` stays instant."""
    import embstore

    return embstore.open(path, create=create)


def conclude(outcome: Outcome, store: str) -> None:
    """End a command as its outcome says: a line on stderr for whatever is not done, and
    the exit status (0 only when every selected item is done; see `embstore.outcome`)."""
    for line in outcome.messages(store):
        click.echo(line, err=True)
    if outcome.exit_status:
        sys.exit(outcome.exit_status)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def echo_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.ljust(widths[c]) for c in columns))
    click.echo("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        click.echo("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
