"""int8 (v2) against the fp32 ground truth on a trained model: top-1 agreement >= 99%.

The C int8 path quantizes activations to Q8_0 as well as weights, so its logits differ
slightly from model.py run on the same (dequantised) weights; a trained model's peaked
distributions make its greedy choices robust to that. The stories260K fixture is not
a good yardstick here: its greedy path is full of near-ties (see the second test).
"""

import numpy as np
import pytest
import torch
from torch import nn

import export
import runtime
from tests.common import STORIES260K, need


def greedy_agreement(model_bin, tmp_path, steps=200):
    """Fraction of positions of a C int8 greedy run where model.py (dequantised) picks the same token."""
    model = export.load_model_bin(model_bin).eval()
    export.write_v2(model, tmp_path / "q.bin")
    deq = export.load_model_bin(tmp_path / "q.bin").eval()
    with runtime.Model(tmp_path / "q.bin") as cmodel:
        steps = min(steps, cmodel.seq_len - 1)
        ids = cmodel.generate(steps=steps, temperature=0, stop_at_bos=False)
    assert len(ids) == steps + 1
    with torch.no_grad():
        ref = deq(torch.tensor([ids[:steps]]))[0][0].numpy()
    return float(np.mean(ref.argmax(-1) == np.array(ids[1 : steps + 1])))


def test_int8_top1_agreement_on_a_trained_model(trained_model, tmp_path):
    assert greedy_agreement(trained_model, tmp_path) >= 0.99


def test_stories260K_greedy_path_is_fragile(tmp_path):
    """Why stories260K is not held to 99%: 0.1% random noise on every matmul input already
    flips several of its 200 greedy choices, and int8 activations are that noisy."""
    model = export.load_model_bin(need(STORIES260K)).eval()
    ids = model.generate(torch.tensor([[1]]), 200, temperature=0.0)[:, :200]
    with torch.no_grad():
        ref = model(ids)[0].argmax(-1)
        torch.manual_seed(0)
        hooks = [m.register_forward_pre_hook(lambda m, inp: (inp[0] * (1 + 1e-3 * torch.randn_like(inp[0])),))
                 for m in model.modules() if isinstance(m, nn.Linear)]
        noisy = model(ids)[0].argmax(-1)
        for h in hooks:
            h.remove()
    assert (noisy == ref).float().mean().item() < 0.995
    assert greedy_agreement(STORIES260K, tmp_path) >= 0.93


@pytest.mark.parametrize("steps", [200])
def test_fp32_is_exact_on_the_trained_model(trained_model, steps):
    model = export.load_model_bin(trained_model).eval()
    expected = model.generate(torch.tensor([[1]]), steps, temperature=0.0)[0].tolist()
    with runtime.Model(trained_model) as cmodel:
        assert cmodel.generate(steps=steps, temperature=0, stop_at_bos=False) == expected
