"""Group-relative advantages (GRPO), with the expert demonstration in its prompt's group.

Shape suffixes: n sequences of the batch (rollouts and demonstrations), g groups (prompts).
"""
from __future__ import annotations

import torch


def group_advantages(rewards_n: torch.Tensor, group_ids_n: torch.Tensor,
                     is_demo_n: torch.Tensor, *, demo_in_group: bool = True,
                     std_norm: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """arXiv 2506.19767, Eq. 7: A_k = (r_k - mean(r_group)) / std(r_group).

    group_ids_n: the prompt index of each sequence. demo_in_group: the demonstration's
    reward counts in its group's mean and std (the paper); otherwise the statistics come
    from the rollouts alone and are still applied to the demonstration. std_norm=False
    gives mean-centring only (LUFFY). The std is the unbiased one (as torch.std). A group
    whose members share one reward, or with a single member, gives zero advantage
    to its members (a demonstration outside such a group keeps its centred reward).
    Returns fp32 [n].
    """
    r_n = rewards_n.float()
    gid_n = torch.unique(group_ids_n, return_inverse=True)[1]
    n_groups = int(gid_n.max().item()) + 1 if gid_n.numel() else 0
    member_n = torch.ones_like(r_n) if demo_in_group else (~is_demo_n.bool()).float()

    def per_group_sum(x_n):
        return torch.zeros(n_groups, dtype=torch.float32, device=r_n.device).index_add_(
            0, gid_n, x_n * member_n)

    count_g = per_group_sum(torch.ones_like(r_n))
    mean_g = per_group_sum(r_n) / count_g.clamp(min=1)
    centred_n = r_n - mean_g[gid_n]
    if not std_norm:
        return centred_n
    var_g = per_group_sum(centred_n ** 2) / (count_g - 1).clamp(min=1)
    std_n = var_g.sqrt()[gid_n]
    # a group with one reward value has std 0: its members are centred to exactly 0, and a
    # demonstration outside the group keeps its centred reward instead of a 1/eps blow-up
    return centred_n / torch.where(std_n > eps, std_n + eps, torch.ones_like(std_n))
