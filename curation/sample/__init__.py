"""The embedded sample data set: synthetic image/video/audio-caption pairs with labelled defects, and a loopback
HTTP server to crawl it from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from curation.sample.generate import DEFECTS, generate_sample
from curation.sample.media import media_folder

if TYPE_CHECKING:
    from curation.sample.server import SampleServer, write_url_lists

__all__ = ["DEFECTS", "SampleServer", "generate_sample", "media_folder", "write_url_lists"]


def __getattr__(name: str) -> Any:
    # imported lazily so `python -m curation.sample.server` does not find its module already loaded
    if name in ("SampleServer", "write_url_lists"):
        from curation.sample import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
