"""The kv-cache manager: owns each instance's logical KV block pool."""
