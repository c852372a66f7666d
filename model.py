"""The Llama 2 architecture, as llama2.c has it: the ground truth for every runtime.

RMSNorm, rotary embeddings on adjacent pairs (llama2.c's layout; Hugging Face uses
half-split heads, see export.py), grouped-query attention, a SwiGLU feed-forward,
and a classifier tied to the token embedding. `generate()` keeps a KV cache.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import modelbin

META_INIT_PARAMS = 50_000_000  # from_state_dict builds models larger than this without a random init first


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    hidden_dim: int | None = None  # None: derived from dim and multiple_of, as in Llama 2
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # RoPE base: pair i of a head turns by position * rope_theta^(-2i/head_dim)
    max_seq_len: int = 256
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size {self.dim // self.n_heads} must be even for rotary embeddings")
        for name in ("norm_eps", "rope_theta"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x * rsqrt(mean(x^2) + eps) * weight, in fp32, as one op
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0):
    """cos and sin of position * frequency, shape (max_seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def rope_rotation(cos, sin):
    """rope_tables' rows (T, head_dim // 2) as apply_rope reads them, (T, 1, head_dim): each angle's cos for both
    elements of its pair, its sin as (-sin, +sin)."""
    return cos.repeat_interleave(2, -1)[:, None], torch.stack((-sin, sin), -1).flatten(-2)[:, None]


def apply_rope(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle: (x0 cos - x1 sin, x1 cos + x0 sin),
    as x * cos + (x with each pair swapped) * sin, in few ops (a one-token step runs it 2 x n_layers times).

    x: (B, T, n_heads, head_dim); cos, sin: from rope_rotation.
    """
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (x32 * cos + swapped * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, kv_cache=None, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)

        mask, is_causal = None, kv_cache is None
        if kv_cache is not None:
            # Store this step's keys/values in place, then attend over everything so far: one new token
            # sees every key; query i of a longer chunk (the prompt) sees keys up to start_pos + i.
            cache_k, cache_v = kv_cache
            cache_k[:B, :, start_pos : start_pos + T] = k
            cache_v[:B, :, start_pos : start_pos + T] = v
            k, v = cache_k[:B, :, : start_pos + T], cache_v[:B, :, : start_pos + T]
            if T > 1:
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)

        # Grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        out = out.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, kv_cache=None, start_pos: int = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, kv_cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied classifier, as llama2.c trains it

        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # Scaled init of the projections that write into the residual stream (GPT-2 paper).
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def shares_classifier(self) -> bool:
        return self.output.weight is self.tok_embeddings.weight

    def untie_classifier(self) -> None:
        """Give the classifier its own weight (files whose classifier is stored separately)."""
        if self.shares_classifier:
            self.output.weight = nn.Parameter(self.tok_embeddings.weight.detach().clone())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens, targets=None, kv_cache=None, start_pos: int = 0):
        """tokens (B, T) -> (logits (B, T, vocab), loss or None).

        With a kv_cache (from new_kv_cache), tokens are positions start_pos.. of a
        sequence whose earlier keys/values the cache already holds.
        """
        logits = self.output(self.hidden_states(tokens, kv_cache, start_pos)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, tokens, kv_cache=None, start_pos: int = 0):
        """tokens (B, T) -> the normed last hidden states (B, T, dim) that the classifier reads."""
        T = tokens.shape[1]
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
        cos, sin = rope_rotation(self.rope_cos[start_pos : start_pos + T], self.rope_sin[start_pos : start_pos + T])
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if kv_cache is None else kv_cache[i], start_pos)
        return self.norm(h)

    def next_logits(self, tokens, kv_cache=None, start_pos: int = 0, classifier=None):
        """Logits (B, vocab) of the token after `tokens` (B, T): only the last position is classified.
        classifier: output.weight as a contiguous (dim, vocab) matrix, if the caller made one (stream)."""
        h = self.hidden_states(tokens, kv_cache, start_pos)[:, -1]
        return (self.output(h) if classifier is None else h @ classifier).float()

    def cpu_classifier(self):
        """output.weight as a contiguous (dim, vocab) matrix on the CPU (else None), made once and remade
        only after the weight changes: CPU BLAS multiplies one row by it ~3x faster than by nn.Linear's
        (vocab, dim) layout, and the classifier is the largest matrix."""
        w = self.output.weight
        if w.device.type != "cpu":
            return None
        key = (w.data_ptr(), w._version)
        if getattr(self, "_cpu_classifier", (None, None))[0] != key:
            with torch.no_grad():
                self._cpu_classifier = (key, w.t().contiguous())
        return self._cpu_classifier[1]

    def new_kv_cache(self, batch_size: int = 1):
        """One (keys, values) pair per layer, each (B, n_kv_heads, max_seq_len, head_dim), written in place."""
        a, p = self.args, self.tok_embeddings.weight
        shape = (batch_size, a.n_kv_heads, a.max_seq_len, a.head_dim)
        return [(p.new_zeros(shape), p.new_zeros(shape)) for _ in range(a.n_layers)]

    def compiled_next_logits(self):
        """next_logits through torch.compile, compiled on first use and kept for this model's later calls.

        Only the one-token steps go through it (the prompt runs eagerly), so the position is its one
        changing input: dynamic=True makes it symbolic, one compile serves every position.
        """
        if getattr(self, "_compiled_next_logits", None) is None:
            self._compiled_next_logits = torch.compile(self.next_logits, dynamic=True)
        return self._compiled_next_logits

    @torch.inference_mode()
    def stream(self, tokens, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None,
               stop_tokens=(), use_cache: bool = True, compile: bool = False, sampler=None, keep: int = 0):
        """Yield new token ids (B,) one step at a time, continuing `tokens` (B, T).

        sampler: a callable logits (B, vocab) -> ids (B,) that replaces sample_next and its settings
        (temperature, top_k, top_p, generator), e.g. Llama2cSampler for llama2.c's ids.

        Stops early once every sequence has produced one of `stop_tokens` (e.g. BOS/EOS), and at
        max_seq_len unless keep > 0: then, whenever the context is full, its first `keep` tokens
        stay, the older half of the rest (rounded up) is dropped and generation goes on, as the C
        and Zig runtimes' -k does (docs/design-notes.md). use_cache=False recomputes the whole
        context for every token, as llama2.c's model.py does (same ids, slower). compile=True runs
        the one-token steps through torch.compile: it pays only over thousands of tokens (see
        bench/bench_torch.py).
        """
        B, T = tokens.shape
        S = self.args.max_seq_len
        if not 0 <= keep < S:
            raise ValueError(f"keep must be in 0..{S - 1} (max_seq_len - 1), got {keep}")
        if keep and T > S:
            raise ValueError(f"prompt of {T} tokens exceeds max_seq_len {S}")
        end = T + max(0, max_new_tokens if keep else min(max_new_tokens, S - T))
        seq = tokens.new_empty(B, end)  # the whole sequence, filled in as it grows
        seq[:, :T] = tokens
        cache = self.new_kv_cache(B) if use_cache else None
        classifier = self.cpu_classifier()  # in every mode: the same kernel everywhere, the same ids
        one_token_step = self.compiled_next_logits() if compile and use_cache else self.next_logits
        stop = torch.tensor(list(stop_tokens), dtype=seq.dtype, device=seq.device) if stop_tokens else None
        done = torch.zeros(B, dtype=torch.bool, device=seq.device)
        dropped = 0  # seq[:, keep : keep + dropped] has left the context; seq[:, i] after it is at i - dropped
        for pos in range(T, end):
            shift = pos - dropped > S  # the context, seq[:, pos - 1] included, does not fit
            if shift:
                dropped += (S - keep + 1) // 2
            if not use_cache:
                logits = self.next_logits(torch.cat((seq[:, :keep], seq[:, keep + dropped : pos]), dim=1)
                                          if dropped else seq[:, :pos], classifier=classifier)
            elif pos == T:
                logits = self.next_logits(tokens, cache, 0, classifier)  # the prompt fills the cache
            elif shift:
                # the tokens after the kept ones move to new positions: run them again (the kept
                # ones' keys and values stay, as they see only each other)
                logits = self.next_logits(seq[:, keep + dropped : pos], cache, keep, classifier)
            else:
                logits = one_token_step(seq[:, pos - 1 : pos], cache, pos - 1 - dropped, classifier)
            token = sampler(logits) if sampler else sample_next(logits, temperature, top_k, top_p, generator)
            seq[:, pos] = token
            yield token
            if stop is not None:
                done |= torch.isin(token, stop)
                if done.all():
                    return

    def generate(self, tokens, max_new_tokens: int, **kwargs):
        """Return `tokens` (B, T) extended by up to max_new_tokens sampled tokens (kwargs: see stream)."""
        new = list(self.stream(tokens, max_new_tokens, **kwargs))
        return torch.cat([tokens, *(t[:, None] for t in new)], dim=1)

    @classmethod
    def from_state_dict(cls, args: ModelArgs, sd: dict, shared: bool | None = None) -> "Transformer":
        """A model in eval mode holding the fp32 weights of `sd`, named as state_dict() names them.

        shared=None: tie the classifier if output.weight equals the embedding (or is absent).
        Raises ValueError when the weights do not fit `args`.
        """
        sd = dict(sd)
        if "output.weight" not in sd:
            shared = True
        elif shared is None:
            shared = torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
        if shared:
            sd["output.weight"] = sd["tok_embeddings.weight"]
        # A big model is built on the meta device and given the weights directly: a random init that
        # the weights overwrite takes seconds at 110M params and grows with size. (Not for small ones:
        # the meta device's first use imports torch._dynamo, about as slow as a 100M init.)
        n_params = sum(t.numel() for t in sd.values())
        with torch.device("meta" if n_params > META_INIT_PARAMS else "cpu"):
            model = cls(args)
        if not shared:
            model.untie_classifier()
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
            raise ValueError(f"weights do not fit a Llama model of shape {args}: {detail}") from None
        if shared:
            model.output.weight = model.tok_embeddings.weight
        model.rope_cos, model.rope_sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            # a buffer this function does not know about: take the slow, always-right way
            model = cls(args)
            if not shared:
                model.untie_classifier()
            model.load_state_dict(sd, strict=True)
        return model.eval()

    @classmethod
    def from_bin(cls, path) -> "Transformer":
        """Load any llama2.c model.bin (v0, v1, v2; v2 is dequantised). Bad files raise modelbin.FormatError."""
        h, tensors = modelbin.read_model(path)
        args = ModelArgs(dim=h.dim, n_layers=h.n_layers, n_heads=h.n_heads, n_kv_heads=h.n_kv_heads,
                         vocab_size=h.vocab_size, hidden_dim=h.hidden_dim, norm_eps=h.norm_eps,
                         rope_theta=h.rope_theta, max_seq_len=h.seq_len)
        sd = {name: torch.from_numpy(t) for name, t in tensors.items() if not name.startswith("rope.")}
        return cls.from_state_dict(args, sd, h.shared_classifier)


def check_logits(logits) -> None:
    """FloatingPointError if the logits hold a NaN or an infinity (the activations overflowed): any token
    drawn from them would be garbage. Their sum is finite unless one is not (or it overflows, and only then
    is each value tested): one reduction, where testing each value every token costs ~20x as much."""
    if not (bool(torch.isfinite(logits.sum())) or bool(torch.isfinite(logits).all())):
        raise FloatingPointError("the model's logits are NaN or infinite (its activations overflowed)")


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None):
    """logits (B, vocab) -> token ids (B,). Temperature 0 is greedy (argmax). NaN or infinite logits raise
    FloatingPointError (check_logits)."""
    check_logits(logits)
    if temperature == 0.0:
        return argmax_rows(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    floor = nucleus_floor(probs, top_p) if top_p is not None and 0.0 < top_p < 1.0 else None
    return draw(probs, generator, floor)


def argmax_rows(x):
    """x.argmax(-1), the first of tied maxima: on the CPU by numpy's SIMD argmax (torch's takes ~25x as long
    on a 32,000-wide row)."""
    if x.device.type != "cpu":
        return x.argmax(dim=-1)
    return torch.from_numpy(x.detach().numpy().argmax(-1))


def draw(probs, generator: torch.Generator | None = None, floor=None):
    """(B, V) probabilities (any total) -> (B,) ids, each drawn with its row's odds, by an exponential race
    as torch.multinomial draws one: the largest p / E of one exponential E = -log(U) per id. Each id has its
    own number, so ids do not move when last-bit differences (cached vs recomputed logits) change which of
    several tied tokens top-k drops. From uniforms: torch's exponential_ takes ~5x as long.
    floor (B, 1), from nucleus_floor: ids less likely than it are left out (top-p)."""
    exponential = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    race = probs / exponential
    if floor is not None:
        race *= probs >= floor  # a multiply: masked_fill of a scattered mask takes ~10x as long
    return argmax_rows(race)


def nucleus_floor(probs, top_p: float):
    """(B, 1): per row, the probability of the token that brings the most likely tokens' total to top_p;
    top-p keeps the tokens at least that likely. Only the candidates are sorted, and only their values
    (numpy's SIMD sort: ~15x torch.sort with indices): as in llama2.c, a token less likely than
    (1 - top_p) / (V - 1) cannot be in the nucleus, since all of those together hold less than 1 - top_p."""
    rows = probs.float().cpu().numpy()
    cutoff = (1.0 - top_p) / max(1, rows.shape[-1] - 1)
    floors = np.empty(len(rows), np.float32)
    for i, row in enumerate(rows):
        for pool in (row[row >= cutoff], row):  # the whole row where rounding leaves the candidates short
            top = np.sort(pool)[::-1]
            totals = np.cumsum(top)
            if len(top) and totals[-1] >= top_p:
                break
        floors[i] = top[min(int((totals < top_p).sum()), len(top) - 1)]  # the totals rise
    return torch.from_numpy(floors).to(probs.device)[:, None]


class Llama2cSampler:
    """llama2.c's sampler (run.c's sample()): for the same seed, temperature and top-p, the ids that
    llama2.c and this project's C runtime print. A callable for stream()/generate(sampler=...).

    Its own random numbers (xorshift64*, one coin per token, drawn after the softmax), float32 arithmetic
    in run.c's order (sequential sums: np.cumsum; np.sum adds pairwise), top-p over the tokens whose
    probability is at least (1 - top_p) / (vocab - 1), sorted by probability. Temperature 0 is greedy;
    top-p 0 or 1 samples from the whole distribution. Seed 0 is refused: llama2.c reads it as "seed from
    the clock", and xorshift never leaves a zero state. One host sync per token (the logits row).
    """

    MASK = 2**64 - 1

    def __init__(self, seed: int, temperature: float = 1.0, top_p: float = 0.9):
        if not 0 < seed <= self.MASK:
            raise ValueError(f"seed must be between 1 and 2**64 - 1, got {seed}")
        self.state = seed
        self.temperature, self.top_p = np.float32(temperature), np.float32(top_p)

    def random_u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & self.MASK
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & self.MASK) >> 32

    def random_f32(self) -> np.float32:
        return np.float32((self.random_u32() >> 8) / 16777216.0)  # 24 random bits: exact in float32, in [0, 1)

    def __call__(self, logits) -> torch.Tensor:
        """logits (B, vocab) -> token ids (B,), one row after another (one coin each)."""
        check_logits(logits)
        rows = logits.float().cpu().numpy()
        return torch.tensor([self.sample(row) for row in rows], device=logits.device)

    def sample(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))  # the first of equal maxima, as run.c's argmax
        z = logits / self.temperature
        x = np.exp(z - np.max(z))
        probs = x / np.cumsum(x)[-1]  # the softmax
        coin = self.random_f32()
        if self.top_p <= 0 or self.top_p >= 1:
            return self.pick(np.cumsum(probs), coin, len(probs) - 1)
        cutoff = (np.float32(1) - self.top_p) / np.float32(len(probs) - 1)
        candidates = np.flatnonzero(probs >= cutoff)
        candidates = candidates[np.argsort(-probs[candidates], kind="stable")]  # equal probabilities: lower id first
        cumulative = np.cumsum(probs[candidates])
        over = np.flatnonzero(cumulative > self.top_p)
        last = int(over[0]) if len(over) else len(candidates) - 1  # the nucleus: candidates[:last + 1]
        return int(candidates[self.pick(cumulative[: last + 1], coin * cumulative[last], last)])

    @staticmethod
    def pick(cdf: np.ndarray, r: np.float32, fallback: int) -> int:
        """The first i with r < cdf[i] (cdf ascending), else fallback (rounding left the total below r)."""
        i = int(np.searchsorted(cdf, r, side="right"))
        return i if i < len(cdf) else fallback
