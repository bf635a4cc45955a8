"""Each loss term against a hand-worked 2x2 case."""

import torch

from lowmcgm.losses import LossParts, compute_attention_loss, compute_masked_diffusion_loss, compute_total_loss


def test_masked_diffusion_loss_averages_over_all_elements():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.zeros_like(pred)
    union = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    # Masked squares 1 and 16, averaged over 4 elements (not over the 2 masked ones).
    assert compute_masked_diffusion_loss(pred, target, union).item() == (1 + 16) / 4


def test_attention_loss_normalises_by_max_and_divides_by_batch():
    maps = torch.tensor([[[[0.2, 0.4], [0.0, 0.1]]]])  # (B=1, K=1, 2, 2); max 0.4
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # map/max = [.5, 1, 0, .25]; squared errors .25, 0, 0, .0625 -> mean .078125
    assert abs(compute_attention_loss(maps, masks).item() - 0.078125) < 1e-7
    two = torch.cat([maps, maps])  # B=2: per-sample sum divided by B, so the same value
    assert abs(compute_attention_loss(two, torch.cat([masks, masks])).item() - 0.078125) < 1e-7
    k2 = torch.cat([maps, maps], 1)  # K=2 concepts: summed over concepts
    assert abs(compute_attention_loss(k2, torch.cat([masks, masks], 1)).item() - 2 * 0.078125) < 1e-7


def test_total_loss_weights():
    parts = LossParts(rec=torch.tensor(1.0), attn=torch.tensor(2.0), mask_attn=torch.tensor(10.0),
                      prior=torch.tensor(4.0))
    assert abs(compute_total_loss(parts, 0.01, 0.3, 1.0).item() - (1 + 0.01 * (2 + 3) + 4)) < 1e-6
    assert parts.as_floats() == {"rec": 1.0, "attn": 2.0, "mask_attn": 10.0, "prior": 4.0}
