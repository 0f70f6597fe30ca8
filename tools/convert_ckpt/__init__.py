"""``srft-convert``: HF <-> Megatron dist_checkpointing conversion (see ``cli.py``)."""
