"""What the steps eat: an encoded split, its epoch order, and the global batches built from it.

Every process knows every row, so all agree on the order and the padded lengths; each collates and
transfers only the rows its own devices hold (`kwjax.distributed`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from kwjax import batching, distributed

KINDS = ("sft", "dpo")  # one sequence per row, or a (chosen, rejected) pair per row


@dataclasses.dataclass
class Data:
    """Encoded rows of one split: SFT sequences or DPO pairs, with their ids."""

    items: list
    ids: list[str]
    report: batching.Report
    kind: str  # "sft" or "dpo"

    def collate(self, indices, bucket: int, rows: int) -> dict[str, np.ndarray]:
        chosen = [self.items[i] for i in indices]
        if self.kind == "sft":
            return batching.collate(chosen, bucket, rows=rows)
        return batching.collate_pairs(chosen, bucket, rows=rows)

    def rows(self, indices, batch_size: int) -> list:
        """The batch's rows in collated order (DPO: chosen rows, then rejected rows); None pads."""
        return batching.batch_rows([self.items[i] for i in indices], self.kind, batch_size)

    def tokens(self, indices) -> int:
        """Real (unpadded) tokens the rows hold, prompts included; a pair counts both sequences."""
        seqs = [self.items[i] for i in indices]
        if self.kind == "dpo":
            seqs = [s for pair in seqs for s in pair]
        return sum(len(s.prompt) + len(s.response) for s in seqs)

    def lengths(self) -> np.ndarray:
        """Each row's padded-length driver: its sequence (SFT) or the longer of its pair (DPO)."""
        if self.kind == "sft":
            return np.array([len(s) for s in self.items])
        return np.array([max(len(s) for s in pair) for pair in self.items])

    def weight(self, indices) -> float:
        """What one batch counts for in a mean over the split: response tokens (SFT) or pairs (DPO)."""
        if self.kind == "sft":
            return float(sum(len(self.items[i].response) for i in indices))
        return float(len(indices))


def encode(rows: list[dict], tokenizer, config, kind: str) -> Data:
    fn = batching.encode_sft if kind == "sft" else batching.encode_dpo
    items, ids, report = fn(tokenizer, rows, config.data.max_length, config.data.too_long)
    return Data(items, ids, report, kind)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch e's row order: seeded by (seed, e) alone, so a resumed run sees the batches it would have."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(seed: int, epoch: int, lengths: np.ndarray, batch_size: int, group: int = 0) -> list[np.ndarray]:
    """Epoch e's batches of row indices, seeded by (seed, e) alone (a resumed run sees the same batches).

    group = 0: consecutive slices of a random permutation. group > 0: the permutation is cut into groups
    of `group` rows, each sorted longest first, then cut into batches whose order is shuffled: rows of
    like length share a batch, so less of each batch is padding, while which rows meet still changes
    from epoch to epoch (HF's group_by_length does the same with groups of 50 batches).
    """
    n = len(lengths)
    order = epoch_order(seed, epoch, n)
    if group <= 0:
        return [order[s:s + batch_size] for s in range(0, n, batch_size)]
    chunks = [order[s:s + group] for s in range(0, n, group)]
    order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    cut = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(cut))
    return [cut[i] for i in shuffle]


def rows_seen(seed: int, lengths: np.ndarray, batch_size: int, group: int, steps: int) -> np.ndarray:
    """The sorted row indices that the first `steps` training steps read (epoch by epoch, as
    `epoch_batches` orders them): a capped run needs the reference's log-probs for these rows only."""
    per_epoch = max(1, -(-len(lengths) // batch_size))
    seen: set[int] = set()
    for epoch in range(-(-steps // per_epoch)):
        for idx in epoch_batches(seed, epoch, lengths, batch_size, group)[:steps - epoch * per_epoch]:
            seen.update(int(i) for i in idx)
    return np.asarray(sorted(seen), np.int64)


def global_batch(data: Data, idx, config, mesh, ref_logps: np.ndarray | None = None) -> dict[str, jax.Array]:
    """The global batch of rows `idx` (padded to config.batch_size), sharded over the mesh's batch axes.

    `ref_logps` ([N, 2] cached reference log-probs) adds `ref_logps_B`, laid out like the stacked pairs.
    """
    rows = data.rows(idx, config.batch_size)
    seq_len, resp_len = batching.padded_lengths(rows, config.data.length_bucket)
    local = distributed.process_rows(mesh, len(rows))
    host = batching.collate_rows([rows[i] for i in local], seq_len, resp_len)
    if ref_logps is not None:
        if not np.isfinite(ref_logps[idx]).all():  # rows the reference pass skipped: a bug, not bad input
            raise RuntimeError(f"reference log-probs were not computed for rows {list(idx)}")
        ref = np.zeros(len(rows), np.float32)
        ref[:len(idx)] = ref_logps[idx, 0]
        ref[config.batch_size:config.batch_size + len(idx)] = ref_logps[idx, 1]
        host["ref_logps_B"] = ref[local]
    return distributed.global_batch(mesh, host, len(rows))


def batches(data: Data, batch_size: int):
    """The split in order, one list of row indices per batch (the last one may be short)."""
    n = len(data.items)
    return [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
