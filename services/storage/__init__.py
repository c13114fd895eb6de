"""Object store and state replication: the managed MinIO server and Litestream."""
