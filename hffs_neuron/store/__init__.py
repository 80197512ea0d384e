"""Local data: the shared blob store and the metadata cache."""

from .blobstore import BlobStore, FetchProgress, StoreStats, blob_key
from .metacache import MetadataCache

__all__ = ["BlobStore", "FetchProgress", "MetadataCache", "StoreStats", "blob_key"]
