"""What every command line does with a user's mistake: one line, exit status 2, no traceback.

Each CLI's `main(argv)` is wrapped by `run`, so the rule lives in one place:

    if __name__ == "__main__":
        sys.exit(cli.run(main))

`ArgumentParser` reports bad arguments the same way. A mistake in the user's input (a file, a
flag, a config field) is raised as `UserError`, or as one of the errors a bad file or value
raises anyway (`OSError`, `ValueError`, a download's `RuntimeError` subclass): `run` prints
`error: ` and the message on one line to stderr and returns 2. `--debug` anywhere in the
arguments re-raises instead, traceback and all. Ctrl-C prints one line and returns 130.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"


class UserError(ValueError):
    """A mistake a user can fix, stated as the one line they read: what (the file or field),
    why, and the fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every CLI's help: the description (the module's docstring) and the examples keep their
    lines, and an option's help ends with its default where it has one and does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and not action.required and default is not None
                and default is not False and default is not argparse.SUPPRESS
                and "default" not in text):
            text += " (default: %(default)s)" if text else "default: %(default)s"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument (an unknown choice, a missing one) goes through `run`: one
    line naming it with the valid choices, not the usage block. Its subcommands inherit it.

    The convention of every `python -m pneumojax.*` command: flags are spelled with dashes
    (`--data-dir`; only `--config.field.name=value` overrides keep a config field's name), each
    says what it takes, and `--help` ends with `examples`: commands to copy."""

    def __init__(self, *args, examples: Sequence[str] = (), **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if examples:
            kwargs.setdefault("epilog", EXAMPLES_HEADING + "\n" + "\n".join(
                f"  {e}" for e in examples))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:
        raise UserError(f"{self.prog}: {message}")

    def add_run_arguments(self) -> None:
        """`--workdir` (repeatable: an ensemble) and `--checkpoint`: which trained runs, and
        which of their checkpoints, a command scores (what `ensemble.load` takes)."""
        self.add_argument("--workdir", required=True, action="append", metavar="DIR",
                          help="a training run's folder; repeat it to average several runs "
                          "(an ensemble)")
        self.add_argument("--checkpoint", default="best", help="best, latest or a step number")


EXAMPLES_HEADING = "examples:"  # lower case, as argparse's own "usage:" and "options:"


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input rather than a bug."""
    from pneumojax.data.download import DownloadError  # the CLIs import it anyway

    return (UserError, OSError, ValueError, DownloadError)


def one_line(error: BaseException) -> str:
    """The error's message folded onto one line (a message may quote a multi-line value)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if not isinstance(error, OSError) or error.filename is None or str(
        error.filename) in text else f"{error.filename}: {text}"


def run(main: Callable[[list[str]], int], argv: Sequence[str] | None = None,
        interrupted: str = "interrupted") -> int:
    """`main(argv)` with the rule above; `interrupted` is the line Ctrl-C prints (say how to
    resume, where that applies)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    try:
        return main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except expected_errors() as e:
        return report(e, debug)


def report(error: BaseException, debug: bool) -> int:
    """What `run` does with an expected error, for a caller outside it (absl's flag parsing):
    under `--debug` raises it, else prints its one line and returns 2."""
    if debug:
        raise error
    print(f"error: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
    return 2
