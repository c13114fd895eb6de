"""The object store: models, datasets, checkpoints and backups, content-addressed by SHA-256.

Two backends behind one interface (`ObjectStore`), so the same registry code runs on
either: a folder on this machine (`FilesystemSettings`, the embedded default) or an S3
server, the appliance's own MinIO or any S3-compatible one (`S3Settings`). Settings say
which, and `settings.open()` gives the store. The database holds metadata only.
"""

from appliance.objectstore.base import BUCKETS, ObjectStore, StoredObject, content_key, sha256_file
from appliance.objectstore.filesystem import FilesystemSettings, FilesystemStore
from appliance.objectstore.s3 import S3Settings, S3Store

# Which store and how to reach it; serialised with a "kind" field ("filesystem" or "s3").
ObjectStoreSettings = FilesystemSettings | S3Settings

__all__ = ["BUCKETS", "FilesystemSettings", "FilesystemStore", "ObjectStore", "ObjectStoreSettings", "S3Settings",
           "S3Store", "StoredObject", "content_key", "sha256_file"]
