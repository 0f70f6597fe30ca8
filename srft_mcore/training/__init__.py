"""Training: srft-train (cli, run_inputs), the SRFT loop (trainer) with its policy and rollout sides, micro-batches, checkpoints, a rank's lifecycle, metrics and plots."""
