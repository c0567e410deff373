"""The defaults shared by every model config live in the package (`pneumojax.defaults`), so
that a run's workdir can be read without this folder; model files import them from here."""

from pneumojax.defaults import get_config

__all__ = ["get_config"]
