"""A tiny training run in a fresh process, for tests that need one.

Fake CPU devices and jax.distributed must be set up before JAX starts, and a run that is
killed must be a process of its own.
"""

import argparse
import os
import pathlib
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--devices", type=int, default=1, help="fake CPU devices in this process")
    p.add_argument("--num-devices", type=int, default=None, help="mesh size")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--stall-on-save", type=int, default=0,
                   help="on the Nth checkpoint save, touch WORKDIR/stalled and hang mid-write")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from pneumojax import xla_cpu
    xla_cpu.set_flags()

    from pneumojax import sharding
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import grain
    from pneumojax import training
    from tests.conftest import tiny_config

    if args.stall_on_save:
        handler, real_save, calls = grain.checkpoint.CheckpointHandler, None, [0]
        real_save = handler.save

        def stalling_save(self, directory, *a, **k):
            calls[0] += 1
            real_save(self, directory, *a, **k)  # part of the checkpoint is on disk now
            if calls[0] == args.stall_on_save:
                (pathlib.Path(args.workdir) / "stalled").touch()
                time.sleep(600)
        handler.save = stalling_save

    config = tiny_config(args.data_dir, epochs=args.epochs, num_devices=args.num_devices)
    training.train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
    main()
