"""pneumojax: pneumonia detection in chest X-rays, in pure JAX.

Importing the package adds one XLA:CPU flag to `XLA_FLAGS`, before JAX starts its backend,
unless `XLA_FLAGS` already sets it:

    --xla_cpu_experimental_ynn_fusion_type=-individual_convolution

jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK, whose backward-filter (kernel
gradient) convolutions ran 2-3.5x slower than XLA's own Eigen convolutions on a 2-core AVX-512
Xeon; without them the deep CNN trains about 1.3x faster there at 64 px and 1.7x at 128 px
(experiments/bench_train.py). The flag only touches XLA:CPU compilations, so it is inert on
GPUs, and it is added only for the jaxlib minor version it was measured with: XLA aborts on
flags it does not know. It has no effect if JAX's backend started before this import.
"""

import os
from importlib import metadata

_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_TESTED_JAXLIB = "0.10."


def _add_cpu_flag() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if _CPU_FLAG.partition("=")[0] in flags:
        return
    try:
        if not metadata.version("jaxlib").startswith(_TESTED_JAXLIB):
            return
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_CPU_FLAG}".strip()


_add_cpu_flag()
