"""Rollout with SGLang: server lifecycle (server.py), /generate client (client.py), weight sync
from the sharded Megatron policy (weight_sync.py: the collective; update_protocol.py,
server_routes.py, sync_buckets.py and the *_transport.py modules: its parts) and the
fault-tolerant engine (engine.py, with recovery.py and server_memory.py)."""
