"""Generation with the KV cache must give the ids that recomputing the whole sequence gives."""

import dataclasses

import numpy as np
import pytest
import torch

from model import Llama2cSampler, ModelArgs, Transformer, draw, nucleus_floor, sample_next
from tests.common import SHARED, STORIES260K, need

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


# Probabilities 0.1, 0.5, 0.25, 0.15 (ids 0-3): sorted 0.5, 0.25, 0.15, 0.1, totals 0.5, 0.75, 0.9, 1.0.
@pytest.mark.parametrize("top_p, kept", [(0.4, [1]), (0.6, [1, 2]), (0.8, [1, 2, 3]), (0.95, [0, 1, 2, 3])])
def test_top_p_keeps_the_most_likely_tokens_until_their_total_reaches_it(top_p, kept):
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.25, 0.15]]))
    drawn = {int(sample_next(logits, 1.0, None, top_p, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == set(kept)


def test_draw_follows_the_odds_and_never_draws_a_zero():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0], [0.0] * 5 + [2.0]])  # any total; zeros at both ends
    ids = torch.stack([draw(probs, torch.Generator().manual_seed(s)) for s in range(4000)])
    assert set(ids[:, 1].tolist()) == {5}
    counts = torch.bincount(ids[:, 0], minlength=6) / 4000
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0], atol=0.03), counts  # 4000 draws: a standard error under 0.008


@pytest.mark.parametrize("scale", [0.01, 1.0, 8.0])  # nearly uniform (every token a candidate) to peaked
@pytest.mark.parametrize("top_p", [0.001, 0.5, 0.9, 0.999999])
def test_nucleus_floor_of_the_candidates_is_that_of_the_whole_sorted_row(scale, top_p):
    probs = torch.softmax(torch.randn(3, 32000, generator=torch.Generator().manual_seed(7)) * scale, dim=-1)
    for row, floor in zip(probs, nucleus_floor(probs, top_p)[:, 0], strict=True):
        ordered = sorted(row.tolist(), reverse=True)
        total, i = 0.0, 0
        while i < len(ordered) - 1 and total + ordered[i] < top_p:  # the first token whose total reaches top_p
            total += ordered[i]
            i += 1
        assert floor == pytest.approx(ordered[i], rel=1e-6) or abs(total + ordered[i] - top_p) < 1e-6


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


# ----------------------------------------------------------------------------- llama2.c's sampler

# xorshift64*'s first u32s, as a C program's uint64_t arithmetic gives them (llama2.c's random_u32)
XORSHIFT_U32 = {
    1: [1206177355, 2882512552, 3117485455, 1303648416],
    42: [1456360119, 3359763283, 3393612768, 4054632243],
    2**64 - 1: [4180462053, 2415166680, 879531507, 3310800028],
}


@pytest.mark.parametrize("seed", XORSHIFT_U32)
def test_llama2c_random_numbers(seed):
    u32s, f32s = Llama2cSampler(seed), Llama2cSampler(seed)
    assert [u32s.random_u32() for _ in range(4)] == XORSHIFT_U32[seed]
    coins = [f32s.random_f32() for _ in range(4)]
    assert all(c.dtype == np.float32 for c in coins)
    assert coins == [(u >> 8) / 2**24 for u in XORSHIFT_U32[seed]]  # the top 24 bits, exactly


def test_llama2c_seed_zero_is_refused():
    with pytest.raises(ValueError, match="seed"):
        Llama2cSampler(0)


def sample_with_coin(probs, coin, top_p):
    """The id Llama2cSampler picks from `probs` at temperature 1 when its coin is `coin`."""
    sampler = Llama2cSampler(1, 1.0, top_p)
    sampler.random_f32 = lambda: np.float32(coin)
    logits = torch.from_numpy(np.log(np.array([probs], dtype=np.float32)))
    return sampler(logits).item()


# Probabilities 0.3, 0.6, 0.05, 0.05. Top-p sorts the candidates by probability, [1, 0, 2, 3] (equal ones: lower
# id first), cuts them after the first whose running total passes top_p, and walks coin * that total.
@pytest.mark.parametrize("coin, top_p, expected", [
    (0.2, 1.0, 0),  # no top-p: the cdf in id order, 0.2 < 0.3
    (0.35, 1.0, 1),
    (0.92, 1.0, 2),
    (0.2, 0.7, 1),  # [1, 0], total 0.9: 0.18 < 0.6, where id order would give 0
    (0.7, 0.7, 0),  # 0.63: past 1's 0.6
    (0.99, 0.5, 1),  # 0.6 > 0.5 alone: the nucleus is [1]
    (0.99, 0.92, 2),  # [1, 0, 2], total 0.95: 0.9405 is past 0.9
    (0.93, 0.99, 2),  # all four, total 1: 0.93 falls in the first of the equal pair, id 2
    (0.97, 0.99, 3),
])
def test_llama2c_top_p_walks_the_candidates_sorted_by_probability(coin, top_p, expected):
    assert sample_with_coin([0.3, 0.6, 0.05, 0.05], coin, top_p) == expected


def test_llama2c_top_p_cut_needs_a_total_over_top_p():
    """0.5 + 0.25 reaches 0.75 exactly: not over it, so the nucleus takes the last 0.25 too."""
    assert sample_with_coin([0.5, 0.25, 0.25], 0.9, 0.75) == 2


def test_llama2c_temperature_zero_is_the_first_argmax():
    sampler = Llama2cSampler(5, 0.0, 0.9)
    assert sampler(torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 0.0, 0.0, 0.0]])).tolist() == [1, 0]
    assert sampler.state == 5  # greedy draws no coin


def test_llama2c_refuses_nan_logits():
    with pytest.raises(FloatingPointError):
        Llama2cSampler(5)(torch.tensor([[0.0, float("nan")]]))


def llama2c_rows():
    """(seed, temperature, top_p, steps, ids) of each row of the llama2.c-sampled fixture (empty without it)."""
    path = SHARED / "llama2c-sampled" / "stories260K_sampled_ids.tsv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[1:]
    return [(int(s), float(t), float(p), int(n), [int(i) for i in ids.split()])
            for s, t, p, n, ids in (line.split("\t") for line in lines)]


def test_llama2c_sampler_prints_llama2c_ids(stories260k):
    """Every row of the ids karpathy/llama2.c's run.c printed on stories260K: from BOS, ended by BOS."""
    rows = llama2c_rows()
    if not rows:
        pytest.skip("fixture llama2c-sampled/stories260K_sampled_ids.tsv not present (../shared is optional)")
    for seed, temperature, top_p, steps, expected in rows:
        sampler = Llama2cSampler(seed, temperature, top_p)
        ids = [t.item() for t in stories260k.stream(torch.tensor([[1]]), steps, sampler=sampler, stop_tokens=(1,))]
        assert ids[: len(expected)] == expected, (seed, temperature, top_p)
        assert ids[len(expected):] == ([1] if len(expected) < steps else [])  # llama2.c stopped at BOS


# ------------------------------------------------------------------ past max_seq_len (keep > 0)


def shifted_by_plain_runs(m, prompt, keep, n):
    """Greedy ids past max_seq_len with keep's meaning spelled out by plain runs (no keep): generate
    until the context fills max_seq_len, take the next id from a forward over that whole context,
    then keep the context's first `keep` ids, drop the older half of the rest (rounded up) and start
    afresh from what is left, as from a prompt. The prompt, then n ids."""
    S = m.args.max_seq_len
    seq = ctx = list(prompt)
    while len(seq) < len(prompt) + n:
        full = m.generate(torch.tensor([ctx]), S - len(ctx), temperature=0.0)[0].tolist()
        out = full + [int(m(torch.tensor([full]))[0][0, -1].argmax())]
        seq = seq + out[len(ctx):]
        ctx = out[:keep] + out[keep + (S - keep + 1) // 2:]
    return seq[: len(prompt) + n]


def wide_random_model(seed=0, **shape):
    """A random model whose greedy ids wander (see tests/runtimes/models.py)."""
    from tests.runtimes.models import random_classifier, random_transformer

    return random_classifier(random_transformer(ModelArgs(**shape), seed), seed + 1)


@pytest.mark.parametrize("keep", [1, 6])
def test_keep_goes_past_max_seq_len_as_plain_runs_over_the_shortened_context(keep):
    m = wide_random_model(**{**MHA, "max_seq_len": 32})
    x = torch.tensor([[1, 40, 7], [1, 250, 9]])
    got = m.generate(x, 4 * 32, temperature=0.0, keep=keep)
    assert got.shape == (2, 3 + 4 * 32)
    for row, prompt in zip(got.tolist(), x.tolist(), strict=True):
        assert row == shifted_by_plain_runs(m, prompt, keep, 4 * 32)
        assert len(set(row[64:])) > 10  # varied ids, far past max_seq_len
    assert torch.equal(m.generate(x, 4 * 32, temperature=0.0, keep=keep, use_cache=False), got)


def test_keep_on_a_trained_model_with_a_short_context(stories260k):
    """stories260K's weights with max_seq_len 64, whose ids vary as a trained model's do."""
    args = dataclasses.replace(stories260k.args, max_seq_len=64)
    m = Transformer.from_state_dict(args, stories260k.state_dict())
    got = m.generate(torch.tensor([[1]]), 4 * 64, temperature=0.0, keep=7)[0].tolist()
    assert got == shifted_by_plain_runs(m, [1], 7, 4 * 64)
    assert len(set(got[128:])) > 10


def test_keep_out_of_range_or_a_prompt_past_max_seq_len_is_refused():
    m = random_model({**MHA, "max_seq_len": 32})
    for keep in (-1, 32):
        with pytest.raises(ValueError, match="keep must be in 0..31"):
            m.generate(prompts(length=3), 5, keep=keep)
    with pytest.raises(ValueError, match="prompt of 33 tokens exceeds max_seq_len 32"):
        m.generate(prompts(length=33), 5, keep=1)
    assert m.generate(prompts(length=32), 5, keep=1).shape == (2, 37)
