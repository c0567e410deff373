"""pneumojax: pneumonia detection in chest X-rays, in pure JAX.

Importing the package changes no process-wide state. The command-line entry points set XLA's
flags with `pneumojax.xla_cpu.set_flags()` before JAX's backend starts; see `xla_cpu` for the
flag, the CPU kernels and the one switch over both.
"""
