"""srft_mcore: SRFT (supervised + reinforcement fine-tuning in one stage) on Megatron-Core."""

__version__ = "0.1.0"
