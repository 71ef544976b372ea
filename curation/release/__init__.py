"""Sharded releases: planning and writing webdataset shards, the dataset card, exports, manifest and publishing.
The release stage (curation/stages/release.py) drives them."""

from curation.release.manifest import publish, verify_release
from curation.release.shards import WebDatasetShardWriter, plan_release

__all__ = ["WebDatasetShardWriter", "plan_release", "publish", "verify_release"]
