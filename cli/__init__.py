"""The ``transerve`` command line (``transerve.cli:app``): the offline side (zoo, export, checkpoints, engines)
and ``serve``. The commands live in their own modules; this package only names the entry point."""

from transerve.cli.main import app

__all__ = ["app"]
