"""Batched generation with a KV cache: prefill, then a decode loop that runs entirely inside `jit`.

Prompts of different lengths share a batch by left padding; positions come from the mask, so a
padded row computes exactly what it would alone. Sliding-window layers keep a ring buffer of at most
`sliding_window` slots (see `model.init_cache`), so cache memory is bounded by the window there.
Prompt width, cache length and batch are rounded up to buckets, so new lengths rarely recompile;
the number of new tokens is a runtime value of the compiled loop.

Each row draws from its own key, `fold_in(fold_in(PRNGKey(seed), row), step)`: a prompt's sample
does not depend on which other prompts share its batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kwjax.models.gemma3.model import Gemma3, init_cache, logits_from_hidden, positions_from_mask

STOP_TOKEN, MAX_NEW_TOKENS = "stop_token", "max_new_tokens"


class SamplingError(ValueError):
    """A generation request that cannot be served (empty prompt, too long, bad settings)."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0
    extra_stop_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise SamplingError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise SamplingError(f"temperature must be positive (use greedy=True for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Sample:
    text: str
    tokens: list[int]  # generated ids, the stop token included when one ended the row
    logprobs: list[float]  # each token's log-prob under the model, before temperature and filters
    stop_reason: str  # "stop_token" or "max_new_tokens"


NUCLEUS_CANDIDATES = 1024  # top-p looks among this many most likely tokens first (see filter_logits)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys whose order is the float32 order (the radix-sort trick: flip negatives entirely,
    set the sign bit of positives)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _nucleus_candidates(logits_BV: jax.Array, probs_BV: jax.Array, top_p: float, candidates: int):
    """Kept-token mask from the `candidates` most likely tokens, and whether they settle every row
    (they do when they hold at least `top_p` of the mass: the crossing token is among them)."""
    B, V = logits_BV.shape
    sorted_BK, order_BK = jax.lax.top_k(logits_BV, candidates)  # ties: lower id first, as a stable sort
    p_BK = jnp.take_along_axis(probs_BV, order_BK, axis=-1)
    before = jnp.cumsum(p_BK, axis=-1) - p_BK  # mass of strictly more likely tokens
    keep = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], order_BK].set(before < top_p)
    return keep, jnp.all(p_BK.sum(axis=-1) >= top_p)


def _nucleus_bisect(logits_BV: jax.Array, probs_BV: jax.Array, top_p: float) -> jax.Array:
    """Kept-token mask by binary search for the threshold, without sorting the vocabulary.

    Token i is kept iff the mass above it, S(l_i) = sum of p_j over l_j > l_i, is below `top_p`. S falls
    as l rises, so the kept set is {l_i >= T} for the smallest key T with S(T) < top_p: 32 halvings of
    the uint32 key range find T exactly. Tokens tied with the crossing token are all kept (a sort would
    keep them in id order until the mass is reached; float ties at that point are vanishingly rare).
    """
    keys_BV = _order_keys(logits_BV)

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        above = jnp.sum(jnp.where(keys_BV > mid[:, None], probs_BV, 0.0), axis=-1)
        ok = above < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    B = logits_BV.shape[0]
    lo = jnp.zeros((B,), jnp.uint32)
    hi = jnp.full((B,), jnp.iinfo(jnp.uint32).max, jnp.uint32)
    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return keys_BV >= lo[:, None]


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float, *,
                  candidates: int | None = NUCLEUS_CANDIDATES) -> jax.Array:
    """Top-k then nucleus (top-p) filtering; removed entries become -inf.

    Nucleus keeps the smallest set of most likely tokens whose probability reaches `top_p` (the
    token that crosses the threshold is kept), as in Holtzman et al. 2020 and transformers.
    Sorting a 262k vocabulary every step costs seconds on a CPU, so the nucleus is looked for among
    the `candidates` most likely tokens (`lax.top_k`); where those hold less than `top_p` of the mass
    (a flat distribution) the step finds the threshold by bisection instead (`_nucleus_bisect`).
    `candidates=None` always bisects.
    """
    neg_inf = jnp.finfo(logits_BV.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg_inf, logits_BV)
    if top_p < 1.0:
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        if candidates is None or candidates >= logits_BV.shape[-1]:
            keep = _nucleus_bisect(logits_BV, probs_BV, top_p)
        else:
            keep, settled = _nucleus_candidates(logits_BV, probs_BV, top_p, candidates)
            keep = jax.lax.cond(settled, lambda: keep, lambda: _nucleus_bisect(logits_BV, probs_BV, top_p))
        logits_BV = jnp.where(keep, logits_BV, neg_inf)
    return logits_BV


INVERSE_CDF_BLOCK = 512  # ids per block of the two-level inverse-CDF draw (262,144 = 512 x 512)
REJECTION_ROUNDS = 32  # nucleus draws by rejection before the exact bisection takes the rows left


def _in_blocks(logits_BV: jax.Array) -> jax.Array:
    """[B, N, K] view of the logits in blocks of `INVERSE_CDF_BLOCK` ids, the last padded with -inf."""
    B, V = logits_BV.shape
    block = min(INVERSE_CDF_BLOCK, V)
    return jnp.pad(logits_BV, ((0, 0), (0, (-V) % block)), constant_values=-jnp.inf).reshape(B, -1, block)


def _fold_rows(keys_B: jax.Array, i) -> jax.Array:
    """Each row's key folded with the same `i` (a step, a round): rows keep independent streams."""
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)


def _cdf_blocks(logits_BV: jax.Array, lse_B1: jax.Array):
    """Block masses for `_pick`, from the logits and their logsumexp: the one pass over B x V an
    inverse-CDF draw needs, reusable across draws. Probabilities are never stored for the whole
    vocabulary: at batch 32 and more B x V floats leave the cache, and each pass then reads memory."""
    x_BNK = _in_blocks(logits_BV)
    mass_BN = jnp.sum(jnp.exp(x_BNK - lse_B1[:, :, None]), axis=-1)
    last_block_B = jnp.max(jnp.where(mass_BN > 0, jnp.arange(mass_BN.shape[1]), 0), axis=-1)
    return x_BNK, lse_B1, mass_BN, jnp.cumsum(mass_BN, axis=-1), last_block_B


def _pick(blocks, keys_B: jax.Array) -> jax.Array:
    """The id at which each row's cumulative mass passes its uniform draw: block first, then inside it."""
    x_BNK, lse_B1, mass_BN, cum_BN, last_block_B = blocks
    block = x_BNK.shape[-1]
    u_B = jax.vmap(jax.random.uniform)(keys_B) * cum_BN[:, -1]
    n_B = jnp.minimum(jnp.sum(cum_BN <= u_B[:, None], axis=-1), last_block_B)  # rounding: stay on mass
    u_B = u_B - jnp.take_along_axis(cum_BN - mass_BN, n_B[:, None], axis=-1)[:, 0]
    in_BK = jnp.exp(jnp.take_along_axis(x_BNK, n_B[:, None, None], axis=1)[:, 0] - lse_B1)
    last_id_B = jnp.max(jnp.where(in_BK > 0, jnp.arange(block), 0), axis=-1)
    k_B = jnp.minimum(jnp.sum(jnp.cumsum(in_BK, axis=-1) <= u_B[:, None], axis=-1), last_id_B)
    return (n_B * block + k_B).astype(jnp.int32)


def draw_inverse_cdf(p_BV: jax.Array, keys_B: jax.Array) -> jax.Array:
    """One id per row with probability `p_BV` (rows sum to ~1), from a single uniform per row.

    The draw's block of `INVERSE_CDF_BLOCK` ids is found from the block sums, then the id inside it:
    one pass over B x V, where `jax.random.categorical` makes B x V Gumbel numbers (on a CPU, at
    evaluation's batch of 36, that took longer than the model's decode step). An id of zero
    probability is never returned.
    """
    return _draw_filtered(jnp.log(p_BV), keys_B, jnp.zeros((p_BV.shape[0], 1), p_BV.dtype))


def _draw_filtered(logits_BV, keys_B, lse_B1=None) -> jax.Array:
    if lse_B1 is None:
        lse_B1 = jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True)
    return _pick(_cdf_blocks(logits_BV, lse_B1), keys_B)


def _sample_full(logits_BV, keys_B, top_k: int, top_p: float) -> jax.Array:
    """One draw per row from the filtered distribution over the whole vocabulary (threshold by bisection)."""
    return _draw_filtered(filter_logits(logits_BV, top_k, top_p, candidates=None), keys_B)


def sample_nucleus_by_rejection(logits_BV: jax.Array, keys_B: jax.Array, top_p: float, *,
                                rounds: int = REJECTION_ROUNDS, lse_B1: jax.Array | None = None) -> jax.Array:
    """Exact nucleus draws without finding the nucleus: draw from the whole distribution and keep the
    token when the mass of strictly more likely tokens is below `top_p` (the nucleus's definition;
    ties with the crossing token are kept, as in `_nucleus_bisect`), else draw again.

    A round keeps a row with probability equal to its nucleus's mass (>= top_p), so for top_p = 0.95 a
    row needs 1.05 rounds on average, each one pass over the vocabulary, where bisection takes 32.
    Rows still rejected after `rounds` (probability below (1 - top_p)^rounds) take the bisection's draw.
    """
    if lse_B1 is None:
        lse_B1 = jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True)
    blocks = _cdf_blocks(logits_BV, lse_B1)  # once: each round is then one pass (the mass above its draws)

    def draw(r):
        token_B = _pick(blocks, _fold_rows(keys_B, r))
        l_B1 = jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)
        above_B = jnp.sum(jnp.where(logits_BV > l_B1, jnp.exp(logits_BV - lse_B1), 0.0), axis=-1)
        return token_B, above_B < top_p

    def body(state):
        r, token_B, done_B = state
        new_B, ok_B = draw(r)
        return r + 1, jnp.where(done_B, token_B, new_B), done_B | ok_B

    B = logits_BV.shape[0]
    init = (jnp.int32(0), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
    _, token_B, done_B = jax.lax.while_loop(lambda s: (s[0] < rounds) & ~jnp.all(s[2]), body, init)
    exact = lambda: _sample_full(logits_BV, _fold_rows(keys_B, rounds), 0, top_p)
    return jax.lax.cond(jnp.all(done_B), lambda: token_B, lambda: jnp.where(done_B, token_B, exact()))


def sample_filtered(logits_BV, keys_B, top_k: int, top_p: float, *,
                    candidates: int = NUCLEUS_CANDIDATES) -> jax.Array:
    """One draw per row from the top-k / top-p filtered distribution of `logits_BV`.

    Same distribution as `categorical(filter_logits(...))`, with far less work over the vocabulary.
    A row whose `candidates` most likely tokens hold `top_p` of the mass (always, for top-k alone
    with k <= candidates) draws among them; the others draw by rejection
    (`sample_nucleus_by_rejection`), computed only in steps where some row needs it.
    """
    vocab = logits_BV.shape[-1]
    if top_k <= 0 and top_p >= 1.0:
        return _draw_filtered(logits_BV, keys_B)  # plain temperature sampling
    if top_k > candidates or min(candidates, vocab) == vocab:
        return _sample_full(logits_BV, keys_B, top_k, top_p)
    k = top_k if top_k > 0 else candidates
    vals_BK, ids_BK = jax.lax.top_k(logits_BV, k)  # ties: lower id first, as filter_logits
    if top_k > 0:  # the nucleus is taken over the renormalised top-k mass, all of it among the k
        lse_B1 = jax.nn.logsumexp(vals_BK, axis=-1, keepdims=True)
    else:
        lse_B1 = jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True)
    p_BK = jnp.exp(vals_BK - lse_B1)
    keep_BK = (jnp.cumsum(p_BK, axis=-1) - p_BK) < top_p if top_p < 1.0 else jnp.ones_like(p_BK, bool)
    pick_B = jax.vmap(jax.random.categorical)(keys_B, jnp.where(keep_BK, vals_BK, -jnp.inf))
    fast_B = jnp.take_along_axis(ids_BK, pick_B[:, None], axis=-1)[:, 0]
    if top_k > 0:
        return fast_B
    settled_B = p_BK.sum(axis=-1) >= top_p
    slow = lambda: sample_nucleus_by_rejection(logits_BV, _fold_rows(keys_B, 1), top_p, lse_B1=lse_B1)
    return jax.lax.cond(jnp.all(settled_B), lambda: fast_B, lambda: jnp.where(settled_B, fast_B, slow()))


def first_max(logits_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First index of each row's maximum (as `argmax`) and the maximum, found block by block.

    The max of each block of `INVERSE_CDF_BLOCK` ids, the first block holding the row's maximum, then
    the first id inside that block: one plain reduction over B x V. XLA:CPU's `argmax` (a reduction
    over (value, index) pairs), and a compare-and-min over the whole row, took 10x longer at batch 32.
    """
    V = logits_BV.shape[-1]
    x_BNK = _in_blocks(logits_BV)
    block = x_BNK.shape[-1]
    blockmax_BN = jnp.max(x_BNK, axis=-1)
    max_B1 = jnp.max(blockmax_BN, axis=-1, keepdims=True)
    N = blockmax_BN.shape[1]
    n_B = jnp.minimum(jnp.min(jnp.where(blockmax_BN == max_B1, jnp.arange(N), N), axis=-1), N - 1)
    in_BK = jnp.take_along_axis(x_BNK, n_B[:, None, None], axis=1)[:, 0]
    k_B = jnp.min(jnp.where(in_BK == max_B1, jnp.arange(block), block), axis=-1)
    # A NaN row matches nothing: keep the id in range.
    return jnp.minimum(n_B * block + k_B, V - 1).astype(jnp.int32), max_B1


def choose(logits_BV, keys_B, cfg: SamplingConfig):
    """Next token per row and its log-prob under the unmodified distribution."""
    if cfg.greedy:
        token_B, max_B1 = first_max(logits_BV)
    else:
        max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
        token_B = sample_filtered(logits_BV / cfg.temperature, keys_B, cfg.top_k, cfg.top_p).astype(jnp.int32)
    lse_B = max_B1[:, 0] + jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1))
    return token_B, jnp.take_along_axis(logits_BV, token_B[:, None], axis=-1)[:, 0] - lse_B


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two (at least `minimum`): few distinct shapes, at most 2x padding."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("module", "cfg", "cache_len"))
def _generate(module: Gemma3, cfg: SamplingConfig, cache_len: int, params, tokens_BT, mask_BT,
              stop_ids_S, row_keys_B, max_new):
    """Prefill and decode in one compiled program; returns (tokens_BN, logprobs_BN, lengths_B, stopped_B)."""
    batch = tokens_BT.shape[0]
    width = cache_len - tokens_BT.shape[1]  # room for new tokens
    cache = init_cache(module.config, batch, cache_len, params["embedding"].dtype)
    positions_BT = positions_from_mask(mask_BT)
    # Prefill projects only the last position onto the vocabulary: the others' logits are never used.
    hidden_BTD, cache = module.apply({"params": params}, tokens_BT, positions_BT, cache, return_hidden=True)
    logits_BV = logits_from_hidden(module.config, params["embedding"], hidden_BTD[:, -1:])[:, 0]
    next_pos_B = positions_BT[:, -1] + 1

    def emit(step, logits_BV, out_BN, logp_BN, done_B, stopped_B):
        """Chooses and records token `step` of every row still going."""
        keys_B = _fold_rows(row_keys_B, step)
        token_B, logp_B = choose(logits_BV, keys_B, cfg)
        token_B = jnp.where(done_B, 0, token_B)
        out_BN = out_BN.at[:, step].set(token_B)
        logp_BN = logp_BN.at[:, step].set(jnp.where(done_B, 0.0, logp_B))
        hit_B = jnp.any(token_B[:, None] == stop_ids_S[None], axis=-1) & ~done_B
        return token_B, out_BN, logp_BN, done_B | hit_B, stopped_B | hit_B

    # Each turn feeds the previous token and chooses the next, so the loop never runs the model for
    # logits that would not be used (after the last token, or once every row has stopped).
    def body(state):
        step, token_B, cache, pos_B, out_BN, logp_BN, done_B, stopped_B = state
        logits_B1V, cache = module.apply({"params": params}, token_B[:, None], pos_B[:, None], cache)
        token_B, out_BN, logp_BN, done_B, stopped_B = emit(step, logits_B1V[:, 0], out_BN, logp_BN, done_B,
                                                           stopped_B)
        return step + 1, token_B, cache, pos_B + 1, out_BN, logp_BN, done_B, stopped_B

    def cond(state):
        step, done_B = state[0], state[6]
        return (step < max_new) & ~jnp.all(done_B)

    first = emit(jnp.int32(0), logits_BV, jnp.zeros((batch, width), jnp.int32),
                 jnp.zeros((batch, width), jnp.float32), jnp.zeros((batch,), bool), jnp.zeros((batch,), bool))
    token_B, out_BN, logp_BN, done_B, stopped_B = first
    init = (jnp.int32(1), token_B, cache, next_pos_B, out_BN, logp_BN, done_B, stopped_B)
    step, _, _, _, out_BN, logp_BN, done_B, stopped_B = jax.lax.while_loop(cond, body, init)
    return out_BN, logp_BN, step, stopped_B


class Sampler:
    """Generates for many prompts in fixed-size batches with one compiled program per bucket."""

    def __init__(self, model, *, batch_size: int = 8):
        if batch_size <= 0:
            raise SamplingError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        tok = model.tokenizer
        self.stop_ids = (tok.end_of_turn_id, tok.eos_id) if tok is not None else (model.config.eos_id,)

    def encode(self, prompts: Sequence[str], chat: bool) -> list[list[int]]:
        from kwjax.models.gemma3.chat import format_user_prompt

        out = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise SamplingError(f"prompt {i} is empty; every prompt needs text")
            out.append(self.model.tokenizer.encode(format_user_prompt(p) if chat else p, add_bos=True))
        return out

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], cfg: SamplingConfig, *,
                 chat: bool = False, progress: bool = False) -> list[Sample]:
        """Samples for each prompt (text, or token ids that already include <bos>)."""
        cfg.validate()
        if len(prompts) == 0:
            raise SamplingError("no prompts given")
        ids = self.encode(prompts, chat) if isinstance(prompts[0], str) else [list(p) for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise SamplingError("a prompt has no tokens")
        limit = self.model.config.max_position_embeddings
        for i, p in enumerate(ids):
            if len(p) + cfg.max_new_tokens > limit:
                raise SamplingError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={cfg.max_new_tokens} "
                                    f"it exceeds the model's context of {limit} tokens")
        stop_ids = tuple(dict.fromkeys(self.stop_ids + tuple(cfg.extra_stop_ids)))
        batches = range(0, len(ids), self.batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="sampling", unit="batch")
        samples: list[Sample] = []
        for start in batches:
            samples += self._batch(ids[start:start + self.batch_size], start, cfg, stop_ids)
        return samples

    def _batch(self, rows: list[list[int]], first_row: int, cfg: SamplingConfig, stop_ids) -> list[Sample]:
        n = len(rows)
        rows = rows + [rows[0]] * (self.batch_size - n)  # fixed batch shape: one compile
        width = bucket(max(map(len, rows)))
        cache_len = width + bucket(cfg.max_new_tokens, 64)
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
        base = jax.random.PRNGKey(cfg.seed)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(first_row, first_row + len(rows)))
        run_cfg = dataclasses.replace(cfg, max_new_tokens=0, seed=0, extra_stop_ids=())  # static part only
        out, logp, steps, stopped = _generate(
            self.model.module, run_cfg, cache_len, self.model.params, jnp.asarray(tokens), jnp.asarray(mask),
            jnp.asarray(stop_ids, jnp.int32), keys, jnp.int32(cfg.max_new_tokens))
        out, logp, stopped, steps = np.asarray(out), np.asarray(logp), np.asarray(stopped), int(steps)
        samples = []
        for i in range(n):
            toks = out[i, :steps].tolist()
            end = next((j + 1 for j, t in enumerate(toks) if t in stop_ids), len(toks)) if stopped[i] else \
                min(steps, cfg.max_new_tokens)
            toks, lps = toks[:end], logp[i, :end].tolist()
            text = self.model.tokenizer.decode(toks, skip_special=True) if self.model.tokenizer else ""
            samples.append(Sample(text, toks, lps, STOP_TOKEN if stopped[i] else MAX_NEW_TOKENS))
        return samples


def greedy(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...] = ()
           ) -> list[list[int]]:
    """Greedy new token ids for prompts given as ids (kept for the demo and quick checks)."""
    sampler = Sampler(model, batch_size=len(prompts))
    sampler.stop_ids = tuple(stop_ids) or sampler.stop_ids
    return [s.tokens for s in sampler.generate(prompts, SamplingConfig(max_new_tokens, greedy=True))]
