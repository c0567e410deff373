"""pneumojax.cli: a user's mistake is one line and exit status 2; --debug shows the traceback.
And the convention of every `python -m pneumojax.*` command: one help style, with examples, and
flags spelled with dashes."""

import contextlib
import importlib
import io
import pathlib
import re
import subprocess
import sys

import pytest

from pneumojax import cli


def _main(error: BaseException):
    def main(argv: list[str]) -> int:
        assert "--debug" not in argv
        raise error
    return main


def test_a_mistake_is_one_line_and_status_2(capsys):
    assert cli.run(_main(cli.UserError("config field train.epochs: -1 is not above 0;\n"
                                       "set --config.train.epochs=10")), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: config field train.epochs: -1 is not above 0; set --config")


def test_an_os_error_names_its_file(capsys):
    assert cli.run(_main(PermissionError(13, "Permission denied", "/x/y")), []) == 2
    assert "/x/y" in capsys.readouterr().err


def test_debug_reraises_and_a_bug_keeps_its_traceback():
    with pytest.raises(cli.UserError):
        cli.run(_main(cli.UserError("bad")), ["--debug"])
    with pytest.raises(KeyError):
        cli.run(_main(KeyError("a bug")), [])


def test_ctrl_c_prints_how_to_resume(capsys):
    assert cli.run(_main(KeyboardInterrupt()), [], interrupted="resume: same command") == 130
    assert capsys.readouterr().err.strip() == "resume: same command"


def test_success_passes_the_arguments_through():
    assert cli.run(lambda argv: len(argv), ["a", "--debug", "b"]) == 2


# Every `python -m pneumojax.*` command: a package's __main__.py or a module run as a script.
ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts[:-1 if p.name == "__main__.py" else None])
    for p in (ROOT / "pneumojax").rglob("*.py")
    if p.name == "__main__.py" or re.search(r'^if __name__ == "__main__":', p.read_text(), re.M))


def _help(command: list[str]) -> str:
    """`python -m ... --help`: in a subprocess for pneumojax.main (absl's app.run decides its exit
    status), in this process for the argparse CLIs (each subprocess imports JAX: seconds)."""
    if command[0] == "pneumojax.main":
        done = subprocess.run([sys.executable, "-m", *command, "--help"], cwd=ROOT, text=True,
                              capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    module = importlib.import_module(command[0] + (
        ".__main__" if (ROOT / command[0].replace(".", "/") / "__main__.py").is_file() else ""))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as raised:
        module.main([*command[1:], "--help"])
    assert raised.value.code == 0, command
    return out.getvalue()


def test_every_command_has_one_help_style_with_examples_and_dashed_flags():
    assert {"pneumojax.main", "pneumojax.evaluate", "pneumojax.predict", "pneumojax.weights",
            "pneumojax.data"} <= set(COMMANDS)
    helps = {c: _help([c]) for c in COMMANDS}
    # Subcommands, from the usage line's {a,b,c}, each with its own help and examples.
    subcommands = [[c, sub] for c in COMMANDS for group in re.findall(
        r"^usage: .*? \{([\w,-]+)\} \.\.\.$", helps[c], re.M) for sub in group.split(",")]
    assert len(subcommands) >= 5  # data prepare|stats, weights fetch|convert|list
    helps |= {" ".join(c): _help(c) for c in subcommands}
    for name, text in helps.items():
        assert text.startswith(f"usage: python -m {name} "), name
        assert "\noptions:\n" in text, name
        examples = text.split(f"\n{cli.EXAMPLES_HEADING}\n", 1)[-1]
        assert f"\n{cli.EXAMPLES_HEADING}\n" in text and re.match(
            rf"  python -m {re.escape(name)}\b", examples), f"{name}: no example:\n{text}"
        flags = set(re.findall(r"(?<![\w.-])--[A-Za-z][\w-]*", text))
        assert "--help" in flags and not [f for f in flags if "_" in f], (name, sorted(flags))
    assert "--coordinator-address" in helps["pneumojax.main"]
    assert "--config.FIELD" in helps["pneumojax.main"]  # overrides keep the field's own name
