"""Rows of text become token batches here, in one place, for every consumer (SFT, DPO, reference, eval).

A sequence is the Gemma chat exchange `<bos>…user turn…<start_of_turn>model\\n{response}<end_of_turn>`.
Only response tokens (the closing `<end_of_turn>` included) are targets. Besides right-padded
`tokens_BT`, a batch carries the *response view*: `target_idx_BR` (the positions whose hidden state
predicts each response token), `targets_BR` and `target_mask_BR`, so losses project only response
positions onto the 262k vocabulary. DPO batches stack all chosen rows, then all rejected rows, on the
batch axis for one forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kwjax.models.gemma3.chat import encode_chat
from kwjax.tokenizer import Tokenizer

TOO_LONG = ("error", "truncate", "drop")


class BatchError(ValueError):
    """A row that cannot become a training sequence under the configured limits."""


@dataclasses.dataclass(frozen=True)
class Sequence_:
    """One encoded exchange: prompt ids (with <bos>) and response ids (ending with <end_of_turn>)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclasses.dataclass
class Report:
    """What encoding did to the rows: nothing happens to a row without being counted here."""

    rows: int = 0
    truncated: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.rows} rows, {len(self.truncated)} truncated, {len(self.dropped)} dropped"
                + (f" (truncated: {', '.join(self.truncated[:5])})" if self.truncated else "")
                + (f" (dropped: {', '.join(self.dropped[:5])})" if self.dropped else ""))


def encode_exchange(tokenizer: Tokenizer, prompt: str, response: str) -> Sequence_:
    ids, mask = encode_chat(tokenizer, prompt, response)
    first = mask.index(1)
    last = len(mask) - mask[::-1].index(1)  # the trailing "\n" after <end_of_turn> is not trained on
    return Sequence_(tuple(ids[:first]), tuple(ids[first:last]))


def _fit(seq: Sequence_, max_length: int, policy: str, row_id: str, what: str, report: Report) -> Sequence_ | None:
    if len(seq) <= max_length:
        return seq
    if policy == "error":
        raise BatchError(f"row {row_id}: {what} has {len(seq)} tokens (prompt {len(seq.prompt)}, response "
                         f"{len(seq.response)}), over data.max_length={max_length}; raise the limit or set "
                         "data.too_long to 'truncate' or 'drop'")
    if policy == "drop" or len(seq.prompt) >= max_length - 1:
        report.dropped.append(row_id)
        return None
    report.truncated.append(row_id)
    return Sequence_(seq.prompt, seq.response[:max_length - len(seq.prompt)])


def encode_sft(tokenizer: Tokenizer, rows: Sequence[dict], max_length: int, too_long: str = "error"
               ) -> tuple[list[Sequence_], list[str], Report]:
    """SFT rows ({input, output, id?}) -> sequences, their ids, and the report."""
    _check_policy(too_long)
    report, out, ids = Report(rows=len(rows)), [], []
    for i, row in enumerate(rows):
        row_id = str(row.get("id", i))
        seq = _fit(encode_exchange(tokenizer, row["input"], row["output"]), max_length, too_long, row_id,
                   "the sequence", report)
        if seq is not None:
            out.append(seq)
            ids.append(row_id)
    return out, ids, report


def encode_dpo(tokenizer: Tokenizer, rows: Sequence[dict], max_length: int, too_long: str = "error"
               ) -> tuple[list[tuple[Sequence_, Sequence_]], list[str], Report]:
    """DPO rows ({prompt, chosen, rejected, id?}) -> (chosen, rejected) pairs, their ids, the report."""
    _check_policy(too_long)
    report, out, ids = Report(rows=len(rows)), [], []
    for i, row in enumerate(rows):
        row_id = str(row.get("id", i))
        before, truncated_before = len(report.dropped), len(report.truncated)
        chosen = _fit(encode_exchange(tokenizer, row["prompt"], row["chosen"]), max_length, too_long, row_id,
                      "the chosen sequence", report)
        rejected = _fit(encode_exchange(tokenizer, row["prompt"], row["rejected"]), max_length, too_long,
                        row_id, "the rejected sequence", report)
        if chosen is None or rejected is None:
            del report.dropped[before:]
            report.dropped.append(row_id)
            continue
        del report.truncated[truncated_before + 1:]  # a pair truncated on both sides counts once
        out.append((chosen, rejected))
        ids.append(row_id)
    return out, ids, report


def _check_policy(policy: str) -> None:
    if policy not in TOO_LONG:
        raise BatchError(f"data.too_long is {policy!r}; expected one of {TOO_LONG}")


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def padded_lengths(seqs: Sequence[Sequence_ | None], bucket: int) -> tuple[int, int]:
    """(sequence length, response length) a batch of these rows is padded to: maxima rounded up to `bucket`."""
    real = [s for s in seqs if s is not None]
    if not real:
        raise ValueError("a batch needs at least one sequence")
    return (round_up(max(len(s) for s in real), bucket), round_up(max(len(s.response) for s in real), bucket))


def collate_rows(seqs: Sequence[Sequence_ | None], seq_len: int, resp_len: int, pad_id: int = 0
                 ) -> dict[str, np.ndarray]:
    """Right-padded arrays for rows of given padded lengths; a None row is an empty (all-masked) row.

    Collating any subset of a batch's rows with the batch's `padded_lengths` gives exactly those rows of
    the whole batch's arrays: a process of a multi-process run collates only the rows its devices hold.
    """
    rows = len(seqs)
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    valid = np.zeros((rows, seq_len), bool)
    target_idx = np.zeros((rows, resp_len), np.int32)
    targets = np.zeros((rows, resp_len), np.int32)
    target_mask = np.zeros((rows, resp_len), bool)
    example_mask = np.zeros((rows,), bool)
    for i, s in enumerate(seqs):
        if s is None:
            continue
        example_mask[i] = True
        full = s.prompt + s.response
        tokens[i, :len(full)], valid[i, :len(full)] = full, True
        r = len(s.response)
        target_idx[i, :r] = np.arange(len(s.prompt) - 1, len(full) - 1)
        targets[i, :r], target_mask[i, :r] = s.response, True
    return {"tokens_BT": tokens, "valid_BT": valid, "target_idx_BR": target_idx, "targets_BR": targets,
            "target_mask_BR": target_mask, "example_mask_B": example_mask}


def batch_rows(items: Sequence, kind: str, rows: int | None = None) -> list[Sequence_ | None]:
    """The rows of one batch in collated order: SFT sequences, or DPO's chosen rows then rejected rows,
    each half padded with None (empty rows) to `rows`."""
    rows = rows or len(items)
    pad = [None] * (rows - len(items))
    if kind == "sft":
        return list(items) + pad
    return [c for c, _ in items] + pad + [r for _, r in items] + pad


def collate(seqs: Sequence[Sequence_], bucket: int, pad_id: int = 0, rows: int | None = None) -> dict[str, np.ndarray]:
    """Right-padded arrays for a list of sequences; lengths rounded up to `bucket` (few shapes, few compiles).

    `rows` pads the batch with empty rows (all masks zero) to a fixed size, e.g. a last partial batch.
    """
    all_rows = batch_rows(seqs, "sft", rows)
    return collate_rows(all_rows, *padded_lengths(all_rows, bucket), pad_id)


def collate_pairs(pairs: Sequence[tuple[Sequence_, Sequence_]], bucket: int, pad_id: int = 0,
                  rows: int | None = None) -> dict[str, np.ndarray]:
    """Chosen rows 0..B-1 then rejected rows B..2B-1, one shared length bucket."""
    all_rows = batch_rows(pairs, "dpo", rows)
    return collate_rows(all_rows, *padded_lengths(all_rows, bucket), pad_id)
