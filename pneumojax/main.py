"""`python -m pneumojax.main --config configs/MODEL.py[:ARG] [--workdir DIR] [--config.x=y ...]`.

A user's mistake (a mistyped flag or config field, a value out of range, a workdir that holds
another run) is one line and exit status 2 before any work, as for every CLI here
(`pneumojax.cli`); `--debug` shows the traceback. Ctrl-C says how to resume.
"""

import pathlib
import re
import shlex
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from pneumojax import cli, config_check, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet50.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder; default workdirs/<config>[_<arg>]. "
                    "Re-running the same command resumes from its last checkpoint.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False, "Multi-host: auto-detect the cluster (SLURM, MPI, ...).")
flags.DEFINE_bool("debug", False, "Show the traceback of a refused command.")
flags.mark_flag_as_required("config")


def default_workdir(config_arg: str) -> pathlib.Path:
    path, _, arg = config_arg.partition(":")
    return pathlib.Path("workdirs") / (pathlib.Path(path).stem + (f"_{arg}" if arg else ""))


def _refuse(problem: str, debug: bool, cause: BaseException | None = None) -> NoReturn:
    """Exits as `cli.run` does on a `UserError`: one line and status 2, or the traceback."""
    error = cli.UserError(problem)
    error.__cause__ = cause
    sys.exit(cli.report(error, debug))


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config in `argv` (absl could not parse it, so it is not in FLAGS)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in ("--config", "-config"):
            return value if eq else next(iter(argv[i + 1:i + 2]), None)
    return None


def _not_loaded(spec: str) -> str:
    path = pathlib.Path(spec.partition(":")[0])
    what = (f"no such file {path.absolute()}" if not path.is_file()
            else "its get_config() returns no ConfigDict")
    return f"--config {spec}: {what}; e.g. --config configs/resnet50.py:demo"


def _flag_problem(error: BaseException, argv: list[str]) -> str:
    """The line that says what is wrong with the flags: a config file that raised, or an
    override of a field the config lacks, diagnosed on a fresh load of the config."""
    spec = _config_argument(argv)
    if spec is None:
        return cli.one_line(error)
    try:
        config = FLAGS["config"].parser.parse(spec)
    except (LookupError, AttributeError, TypeError, ValueError) as e:  # get_config raised
        while e.__context__ is not None:  # ml_collections re-raises it with the traceback
            e = e.__context__
        return f"--config {spec}: {cli.one_line(e)}"
    if not isinstance(config, ml_collections.ConfigDict):
        return _not_loaded(spec)
    overrides = [arg.partition("=")[0].split(".", 1)[1] for arg in argv
                 if re.match(r"-{1,2}(no)?config\.", arg)]
    for path in overrides:
        if problem := config_check.unknown_field(config, path):
            return problem
    return cli.one_line(error)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, under the rule of `pneumojax.cli`: absl answers a bad flag with a
    usage page and status 1, ml_collections a mistyped field with a 50-line traceback."""
    debug = cli.DEBUG_FLAG in argv
    try:
        rest = FLAGS(argv)
    except (flags.Error, LookupError, AttributeError, OSError) as e:
        _refuse(_flag_problem(e, argv), debug, e)
    if not isinstance(FLAGS.config, ml_collections.ConfigDict):  # the file did not load
        _refuse(_not_loaded(config_flags.get_config_filename(FLAGS["config"])), debug)
    return rest


def _run(args: list[str]) -> int:
    if args:
        raise cli.UserError(f"unexpected arguments {shlex.join(args)}; flags take the form "
                            "--name=value")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; the progress bar suffices
        logging.set_verbosity(logging.WARNING)
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.distributed)
    from pneumojax import train  # after jax.distributed, which must precede any JAX use

    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    train.train_and_evaluate(FLAGS.config, workdir)
    return 0


def main(argv: list[str]) -> int:
    command = shlex.join(["python", "-m", "pneumojax.main", *sys.argv[1:]])
    return cli.run(_run, [cli.DEBUG_FLAG] * FLAGS.debug + argv[1:],
                   interrupted=f"interrupted; to resume from the last checkpoint, run the same "
                               f"command: {command}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
