"""`python -m pneumojax.main --config configs/MODEL.py[:ARG] [--workdir DIR] [--config.x=y ...]`."""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from pneumojax import sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/resnet50.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder; default workdirs/<config>[_<arg>]. "
                    "Re-running the same command resumes from its last checkpoint.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool("distributed", False, "Multi-host: auto-detect the cluster (SLURM, MPI, ...).")
flags.mark_flag_as_required("config")


def default_workdir(config_arg: str) -> pathlib.Path:
    path, _, arg = config_arg.partition(":")
    return pathlib.Path("workdirs") / (pathlib.Path(path).stem + (f"_{arg}" if arg else ""))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; the progress bar suffices
        logging.set_verbosity(logging.WARNING)
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id, auto=FLAGS.distributed)
    from pneumojax import train  # after jax.distributed, which must precede any JAX use

    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    print(f"workdir: {workdir}", flush=True)
    train.train_and_evaluate(FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
