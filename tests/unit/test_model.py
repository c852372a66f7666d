import pytest
import torch

from model import ModelArgs, Transformer, apply_rope, rope_rotation, rope_tables, sample_next

GQA_260K = dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4, max_seq_len=512)


def random_model(seed=0, **shape):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**(shape or GQA_260K))).eval()


def test_hidden_dim_matches_tinyllamas_shapes():
    assert ModelArgs(**GQA_260K).hidden_dim == 172
    assert ModelArgs(dim=288, multiple_of=32).hidden_dim == 768
    assert ModelArgs(dim=512, n_heads=8, multiple_of=32).hidden_dim == 1376
    assert ModelArgs(dim=768, n_heads=12, multiple_of=32).hidden_dim == 2048


@pytest.mark.parametrize("bad", [dict(dim=65), dict(n_kv_heads=3), dict(vocab_size=0)])
def test_invalid_shapes_are_rejected(bad):
    with pytest.raises(ValueError):
        ModelArgs(**{**GQA_260K, **bad})


def test_classifier_is_tied_and_init_is_scaled():
    m = random_model()
    assert m.shares_classifier
    wo_std = m.layers[0].attention.wo.weight.std().item()
    wq_std = m.layers[0].attention.wq.weight.std().item()
    assert wo_std == pytest.approx(0.02 / (2 * 5) ** 0.5, rel=0.1)
    assert wq_std == pytest.approx(0.02, rel=0.1)


def test_rope_rotates_adjacent_pairs():
    """Reference: treat (x[2i], x[2i+1]) as a complex number and multiply by e^{i*pos*freq}."""
    torch.manual_seed(1)
    x = torch.randn(1, 7, 2, 8)
    cos, sin = rope_tables(8, 7)
    z = torch.view_as_complex(x.reshape(1, 7, 2, 4, 2))
    angle = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None, :]
    expected = torch.view_as_real(z * angle).flatten(-2)
    assert torch.allclose(apply_rope(x, *rope_rotation(cos, sin)), expected, atol=1e-6)


def test_forward_returns_logits_and_loss():
    m = random_model()
    x, y = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    logits, loss = m(x, y)
    assert logits.shape == (2, 16, 512)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(512.0)).item(), rel=0.05)  # near-uniform at init
    assert m(x)[1] is None


def test_attention_is_causal():
    m = random_model()
    x = torch.randint(0, 512, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 512
    assert torch.equal(m(x)[0][:, :8], m(y)[0][:, :8])
    assert not torch.allclose(m(x)[0][:, 8:], m(y)[0][:, 8:])


def test_kv_cache_logits_match_full_forward():
    m = random_model()
    x = torch.randint(0, 512, (2, 40))
    full, _ = m(x)
    cache = m.new_kv_cache(2)
    # a prompt chunk, then one token at a time
    parts = [m(x[:, :10], kv_cache=cache, start_pos=0)[0]]
    parts += [m(x[:, i : i + 1], kv_cache=cache, start_pos=i)[0] for i in range(10, 40)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("shape", [GQA_260K, dict(dim=48, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=128)])
def test_greedy_generation_same_with_and_without_cache(shape):
    m = random_model(seed=3, **shape)
    x = torch.tensor([[1, 17, 42]])
    with_cache = m.generate(x, 100, temperature=0.0)
    without = m.generate(x, 100, temperature=0.0, use_cache=False)
    assert with_cache.shape == (1, 103)
    assert torch.equal(with_cache, without)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = random_model()
    x = torch.tensor([[1]])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return m.generate(x, 30, temperature=1.0, top_k=100, top_p=0.9, generator=g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_generation_stops_on_stop_token_and_at_max_seq_len():
    m = random_model(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=20)
    x = torch.tensor([[1]])
    first = m.generate(x, 5, temperature=0.0)[0, 1].item()
    stopped = m.generate(x, 50, temperature=0.0, stop_tokens=(first,))
    assert stopped.shape[1] == 2
    assert m.generate(x, 100, temperature=0.0).shape[1] == 20


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {0, 1}
    # probabilities ~ [0.70, 0.26, 0.013, ...]: top_p 0.5 keeps only the first
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert picks == {0}
    assert sample_next(logits, 0.0).item() == 0
