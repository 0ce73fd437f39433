"""The version of the SDK and of the server released with it: the one ``VERSION`` file beside
this module, which both distributions' build metadata read too."""

from importlib.resources import files

__version__ = files("vision_client").joinpath("VERSION").read_text(encoding="utf-8").strip()
