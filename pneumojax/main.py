"""`python -m pneumojax.main --config configs/MODEL.py[:ARG] [--workdir DIR] [--config.x=y ...]`:
train and evaluate one config.

`--config.FIELD=VALUE` overrides one field of the config (`--config.train.epochs=5`); the
fields and their checks are in `pneumojax.config_check`. A user's mistake (a mistyped flag or
config field, a value out of range, a workdir that holds another run) is one line and exit
status 2 before any work, as for every CLI here (`pneumojax.cli`); `--debug` shows the
traceback. Ctrl-C says how to resume.
"""

import pathlib
import re
import shlex
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from pneumojax import cli, config_check, sharding, xla_cpu

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "config file and its argument, e.g. "
                                "configs/resnet50.py:demo", lock_config=True)
flags.DEFINE_string("workdir", None, "output folder (default: workdirs/<config>[_<arg>]); "
                    "running the same command again resumes from its last checkpoint")
# Dashed, as every CLI here spells its flags (`pneumojax.cli`); absl takes a dash in a name,
# read back as FLAGS["coordinator-address"].value.
flags.DEFINE_string("coordinator-address", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num-processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process-id", None, "multi-host: this process's index")
flags.DEFINE_bool("distributed", False, "multi-host: detect the cluster (SLURM, MPI, ...)")
flags.DEFINE_bool("debug", False, "show the traceback of a refused command")
flags.mark_flag_as_required("config")

EXAMPLES = [
    "python -m pneumojax.main --config configs/resnet50.py:demo",
    "python -m pneumojax.main --config configs/deep_cnn.py:cpu --workdir workdirs/mine "
    "--config.train.epochs=5",
    "python -m pneumojax.main --config configs/resnet50.py --coordinator-address=host0:1234 "
    "--num-processes=4 --process-id=0",
]
_METAVARS = {"config": "FILE[:ARG]", "workdir": "DIR", "coordinator-address": "HOST:PORT",
             "num-processes": "N", "process-id": "I"}
HELP_FLAGS = ("-h", "--help", "-help", "-?")  # what absl takes for help, answered by help_text


def help_text() -> str:
    """`--help` in the layout of every other CLI here (argparse's, `cli.ArgumentParser`), from
    absl's definitions of this module's flags; absl's own would exit with status 1."""
    parser = cli.ArgumentParser(prog="python -m pneumojax.main", description=__doc__,
                                examples=EXAMPLES, add_help=False)
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help message and exit")
    for flag in FLAGS.get_flags_for_module(sys.modules[__name__]):
        parser.add_argument(f"--{flag.name}", required=flag.name == "config",
                            default=None if flag.name == "config" else flag.default,
                            help=flag.help, **({"action": "store_true"} if flag.boolean else
                                               {"metavar": _METAVARS.get(flag.name, "VALUE")}))
        if flag.name == "config":
            parser.add_argument("--config.FIELD", metavar="VALUE", help="override one config "
                                "field, e.g. --config.train.epochs=5 (repeatable)")
    return parser.format_help() + ("\nabsl's own flags (logging, profiling; spelled with "
                                   "underscores): --helpfull\n")


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
    if any(a in HELP_FLAGS for a in argv[1:argv.index("--") if "--" in argv else None]):
        print(help_text(), end="")
        sys.exit(0)
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
    sharding.initialize_distributed(FLAGS["coordinator-address"].value,
                                    FLAGS["num-processes"].value, FLAGS["process-id"].value,
                                    auto=FLAGS.distributed)
    from pneumojax import training  # after jax.distributed, which must precede any JAX use

    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    training.train_and_evaluate(FLAGS.config, workdir)
    return 0


def main(argv: list[str]) -> int:
    xla_cpu.set_flags()  # before JAX's backend starts
    command = shlex.join(["python", "-m", "pneumojax.main", *sys.argv[1:]])
    return cli.run(_run, [cli.DEBUG_FLAG] * FLAGS.debug + argv[1:],
                   interrupted=f"interrupted; to resume from the last checkpoint, run the same "
                               f"command: {command}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
