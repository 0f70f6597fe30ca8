"""``srft-doctor``: installation, parallel-layout and HF-parity self-checks."""
