"""pneumojax.cli: a user's mistake is one line and exit status 2; --debug shows the traceback."""

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
