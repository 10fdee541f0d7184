"""``hybridtune ui``: configure, train, watch, compare, chat and export from a browser page."""

from .app import create_app

__all__ = ["create_app"]
