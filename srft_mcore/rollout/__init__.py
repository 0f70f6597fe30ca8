"""Rollout with SGLang: server lifecycle (server.py), /generate client (client.py), weight sync
from the sharded Megatron policy (weight_sync.py) and the fault-tolerant engine (engine.py)."""
