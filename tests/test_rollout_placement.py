"""Rollout server GPU placement from SRFT_ROLLOUT_GPUS (set by the 7B recipe)."""
import pytest

from srft_mcore.rollout.engine import server_gpu_env
from srft_mcore.rollout.errors import RolloutError


def test_servers_get_disjoint_gpu_slices(monkeypatch):
    monkeypatch.delenv("SRFT_ROLLOUT_GPUS", raising=False)
    assert server_gpu_env(0, 2, 2) == {}
    monkeypatch.setenv("SRFT_ROLLOUT_GPUS", "4,5,6,7")
    assert server_gpu_env(0, 2, 2) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert server_gpu_env(1, 2, 2) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    with pytest.raises(RolloutError, match="lists 4 GPUs; 3 servers x server_tp 2 need 6"):
        server_gpu_env(2, 2, 3)
