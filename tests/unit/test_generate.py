"""Generation with the KV cache must give the ids that recomputing the whole sequence gives."""

import pytest
import torch

from model import ModelArgs, Transformer
from tests.common import STORIES260K, need

MHA = dict(dim=48, n_layers=2, n_heads=4, vocab_size=300, multiple_of=16, max_seq_len=96)


@pytest.fixture(scope="module")
def stories260k():
    """A trained model (grouped-query attention): its text varies, as a random model's greedy text does not."""
    return Transformer.from_bin(need(STORIES260K))


def random_model(shape, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(**shape)).eval()


def prompts(batch=2, length=5, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate_both_ways(m, x, n, **sampling):
    """(cached, recomputed) ids for the same prompt, sampling settings and generator seed."""
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        runs.append(m.generate(x, n, generator=g, use_cache=use_cache, **sampling))
    return runs


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=40, top_p=0.9)],
                         ids=["greedy", "seeded"])
def test_trained_model_cached_ids_equal_recomputed_ids(stories260k, sampling):
    x = torch.tensor([[1, 400, 20], [1, 7, 300]])  # BOS and two tokens each: the rows differ
    cached, recomputed = generate_both_ways(stories260k, x, 120, **sampling)
    assert cached.shape == (2, 123)
    assert torch.equal(cached[:, :3], x)
    assert torch.equal(cached, recomputed)
    for row in cached[:, 3:]:
        assert len(set(row.tolist())) > 10  # real text, not one token repeated


def test_random_model_seeded_cached_ids_equal_recomputed_ids():
    cached, recomputed = generate_both_ways(random_model(MHA), prompts(), 80, temperature=1.0)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, 5:].tolist())) > 10


def test_stream_yields_the_tokens_generate_appends(stories260k):
    x = torch.tensor([[1], [1]])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    streamed = torch.stack(list(stories260k.stream(x, 20, temperature=0.8, generator=g1)), dim=1)
    assert torch.equal(streamed, stories260k.generate(x, 20, temperature=0.8, generator=g2)[:, 1:])
    assert not torch.equal(streamed[0], streamed[1])  # one generator, drawn from row by row


def test_prompt_chunk_after_cached_tokens_sees_only_earlier_keys(stories260k):
    """A chunk of several tokens at start_pos > 0 (the masked branch) gives the full forward's logits."""
    x = prompts(length=30, vocab=512)
    full, _ = stories260k(x)
    cache = stories260k.new_kv_cache(2)
    parts = [stories260k(x[:, :10], kv_cache=cache, start_pos=0)[0],
             stories260k(x[:, 10:30], kv_cache=cache, start_pos=10)[0]]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)


def test_stop_tokens_end_generation_once_every_sequence_has_one(stories260k):
    x = torch.tensor([[1, 400], [1, 7]])
    free = stories260k.generate(x, 40, temperature=0.0)
    stops = {free[0, 2].item(), free[1, 15].item()}  # sequence 0 stops at once, sequence 1 at 15 or sooner
    first_stop = [next(i for i in range(2, 42) if free[b, i].item() in stops) for b in range(2)]
    end = max(first_stop) + 1
    stopped = stories260k.generate(x, 40, temperature=0.0, stop_tokens=tuple(stops))
    assert end < 42
    assert torch.equal(stopped, free[:, :end])


def test_no_room_or_no_tokens_asked_yields_nothing():
    m = random_model(MHA)
    full = prompts(length=96)
    assert torch.equal(m.generate(full, 10), full)
    assert torch.equal(m.generate(full[:, :5], 0), full[:, :5])
    assert m.generate(full[:, :90], 50, temperature=0.0).shape == (2, 96)


@pytest.mark.slow
def test_compiled_one_token_step_gives_the_eager_ids(stories260k):
    x = torch.tensor([[1, 400, 20], [1, 7, 300]])
    eager = stories260k.generate(x, 60, temperature=0.0)
    compiled = stories260k.generate(x, 60, temperature=0.0, compile=True)
    assert torch.equal(compiled, eager)
    # another prompt length: the same compiled step serves other positions
    assert torch.equal(stories260k.generate(x[:, :1], 30, temperature=0.0, compile=True),
                       stories260k.generate(x[:, :1], 30, temperature=0.0))
