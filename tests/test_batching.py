"""Rows -> sequences -> padded batches: the split of an exchange, collation, and too-long handling.

Expected arrays are written out by hand (or built from the definitions in a few lines here), never
taken from kwjax.batching itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from kwjax import batching
from kwjax.batching import BatchError, Sequence_
from kwjax.models.gemma3.chat import encode_chat


@pytest.fixture(scope="module")
def tok():
    from kwjax.paths import embedded_gguf_path
    from kwjax.tokenizer import load_tokenizer

    return load_tokenizer(embedded_gguf_path())


# ---------------------------------------------------------------------------------------------------
# encode_exchange


@pytest.mark.parametrize("prompt,response", [
    ("바다, 등대, 갈매기를 넣어 짧은 글을 써 줘.", "  등대 아래에서 갈매기들이 바다를 내려다보았다.\n"),
    ("Write one sentence about rain.", "The rain kept the old street quiet all night."),
    ("빈 응답", ""),
])
def test_encode_exchange_splits_at_the_response(tok, prompt, response):
    eot = tok.piece_to_id("<end_of_turn>")
    newline = tok.encode("\n")
    assert newline == [107] and eot == 106  # Gemma 3 ids; the checks below rely on both being single
    seq = batching.encode_exchange(tok, prompt, response)
    ids, mask = encode_chat(tok, prompt, response)

    p, r = len(seq.prompt), len(seq.response)
    # The exchange is encode_chat's ids without the trailing "\n", cut where the mask turns on.
    assert list(seq.prompt) + list(seq.response) + newline == ids
    assert mask == [0] * p + [1] * r + [0]
    # Prompt: <bos> ... the opening of the model turn; response: the stripped text then <end_of_turn>.
    assert seq.prompt[0] == tok.bos_id
    assert tok.decode(seq.prompt).endswith("<start_of_turn>model\n")
    assert seq.response[-1] == eot and eot not in seq.response[:-1]
    assert tok.decode(seq.response[:-1]) == response.strip()
    assert seq.prompt == tuple(tok.encode(f"<start_of_turn>user\n{prompt.strip()}<end_of_turn>\n"
                                          "<start_of_turn>model\n", add_bos=True))
    assert len(seq) == p + r


# ---------------------------------------------------------------------------------------------------
# collate


def test_collate_by_hand():
    seqs = [Sequence_((2, 5, 6), (7, 8, 106)), Sequence_((2, 9), (10, 106))]
    b = batching.collate(seqs, bucket=4, rows=3)  # longest 6 -> 8; longest response 3 -> 4; 1 padded row
    np.testing.assert_array_equal(b["tokens_BT"], [[2, 5, 6, 7, 8, 106, 0, 0],
                                                   [2, 9, 10, 106, 0, 0, 0, 0],
                                                   [0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["valid_BT"], [[1, 1, 1, 1, 1, 1, 0, 0],
                                                  [1, 1, 1, 1, 0, 0, 0, 0],
                                                  [0, 0, 0, 0, 0, 0, 0, 0]])
    # Response token j sits at position p + j; its predictor is position p + j − 1.
    np.testing.assert_array_equal(b["target_idx_BR"], [[2, 3, 4, 0], [1, 2, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["targets_BR"], [[7, 8, 106, 0], [10, 106, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["target_mask_BR"], [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(b["example_mask_B"], [1, 1, 0])
    assert b["valid_BT"].dtype == bool and b["target_mask_BR"].dtype == bool
    assert b["example_mask_B"].dtype == bool
    assert np.issubdtype(b["tokens_BT"].dtype, np.integer)
    # The response view points at the token before each target, for every valid target.
    for i in range(2):
        for j in np.flatnonzero(b["target_mask_BR"][i]):
            assert b["tokens_BT"][i, b["target_idx_BR"][i, j] + 1] == b["targets_BR"][i, j]


@pytest.mark.parametrize("longest,bucket,width", [(8, 8, 8), (9, 8, 16), (3, 8, 8), (17, 16, 32)])
def test_collate_rounds_lengths_up_to_the_bucket(longest, bucket, width):
    seqs = [Sequence_((2,), tuple(range(10, 10 + longest - 2)) + (106,)), Sequence_((2,), (106,))]
    b = batching.collate(seqs, bucket=bucket)
    assert b["tokens_BT"].shape == (2, width)
    resp_width = -(-(longest - 1) // bucket) * bucket
    assert b["targets_BR"].shape == b["target_idx_BR"].shape == b["target_mask_BR"].shape == (2, resp_width)
    assert b["example_mask_B"].tolist() == [True, True]


def test_collate_pads_with_pad_id():
    b = batching.collate([Sequence_((2, 5), (106,)), Sequence_((2,), (106,))], bucket=4, pad_id=3, rows=3)
    np.testing.assert_array_equal(b["tokens_BT"], [[2, 5, 106, 3], [2, 106, 3, 3], [3, 3, 3, 3]])


def _row(seq: Sequence_, width: int, resp_width: int, pad_id: int = 0):
    """One row of a batch from the definitions (right padding, predictor = position before the target)."""
    full = list(seq.prompt) + list(seq.response)
    p, r = len(seq.prompt), len(seq.response)
    tokens = full + [pad_id] * (width - len(full))
    valid = [1] * len(full) + [0] * (width - len(full))
    idx = list(range(p - 1, p + r - 1)) + [0] * (resp_width - r)
    targets = list(seq.response) + [0] * (resp_width - r)
    mask = [1] * r + [0] * (resp_width - r)
    return tokens, valid, idx, targets, mask


PAIRS = [  # chosen longest in pair 0, rejected longest in pair 1: the halves bucket differently
    (Sequence_((2, 5), (7, 7, 7, 7, 7, 7, 106)), Sequence_((2, 5), (8, 106))),
    (Sequence_((2, 6), (9, 106)), Sequence_((2, 6), (10,) * 10 + (106,))),
]


def test_collate_pairs_chosen_then_rejected_shared_widths():
    b = batching.collate_pairs(PAIRS, bucket=4, rows=3)
    # chosen alone: T 9 -> 12, R 7 -> 8; rejected alone: T 13 -> 16, R 11 -> 12; shared: 16 and 12.
    assert b["tokens_BT"].shape == b["valid_BT"].shape == (6, 16)
    for k in ("target_idx_BR", "targets_BR", "target_mask_BR"):
        assert b[k].shape == (6, 12), k
    order = [PAIRS[0][0], PAIRS[1][0], None, PAIRS[0][1], PAIRS[1][1], None]  # chosen rows, then rejected
    for i, seq in enumerate(order):
        if seq is None:
            assert not b["valid_BT"][i].any() and not b["target_mask_BR"][i].any()
            continue
        tokens, valid, idx, targets, mask = _row(seq, 16, 12)
        np.testing.assert_array_equal(b["tokens_BT"][i], tokens, err_msg=f"row {i}")
        np.testing.assert_array_equal(b["valid_BT"][i], valid, err_msg=f"row {i}")
        np.testing.assert_array_equal(b["target_idx_BR"][i], idx, err_msg=f"row {i}")
        np.testing.assert_array_equal(b["targets_BR"][i], targets, err_msg=f"row {i}")
        np.testing.assert_array_equal(b["target_mask_BR"][i], mask, err_msg=f"row {i}")
    np.testing.assert_array_equal(b["example_mask_B"], [1, 1, 0, 1, 1, 0])


def test_collate_pairs_pads_with_pad_id():
    b = batching.collate_pairs(PAIRS, bucket=4, pad_id=3)
    assert np.all(b["tokens_BT"][~b["valid_BT"]] == 3)


# ---------------------------------------------------------------------------------------------------
# Too-long rows


SHORT = {"id": "s1", "input": "짧은 질문", "output": "짧은 답."}
LONG = {"id": "long1", "input": "긴 답을 써 줘.",
        "output": "등대지기는 매년 겨울 편지를 한 통씩 썼다. " * 6}


def _lengths(tok, prompt, response):
    ids, mask = encode_chat(tok, prompt, response)
    return mask.index(1), sum(mask)  # prompt length, response length (with <end_of_turn>)


@pytest.fixture(scope="module")
def limits(tok):
    sp, sr = _lengths(tok, SHORT["input"], SHORT["output"])
    lp, lr = _lengths(tok, LONG["input"], LONG["output"])
    max_length = lp + 10
    assert sp + sr <= max_length < lp + lr, (sp, sr, lp, lr)
    return {"short": (sp, sr), "long": (lp, lr), "max_length": max_length}


def test_sft_too_long_error_names_row_and_lengths(tok, limits):
    lp, lr = limits["long"]
    with pytest.raises(BatchError) as e:
        batching.encode_sft(tok, [SHORT, LONG], limits["max_length"], "error")
    msg = str(e.value)
    assert "long1" in msg and str(lp + lr) in msg and str(limits["max_length"]) in msg
    assert str(lp) in msg and str(lr) in msg


def test_sft_too_long_truncate(tok, limits):
    m = limits["max_length"]
    seqs, ids, report = batching.encode_sft(tok, [SHORT, LONG], m, "truncate")
    full = batching.encode_exchange(tok, LONG["input"], LONG["output"])
    assert ids == ["s1", "long1"]
    assert report.rows == 2 and report.truncated == ["long1"] and report.dropped == []
    cut = seqs[1]
    assert cut.prompt == full.prompt  # prompt intact
    assert len(cut) == m and cut.response == full.response[:m - len(full.prompt)]
    assert seqs[0] == batching.encode_exchange(tok, SHORT["input"], SHORT["output"])


def test_sft_too_long_drop(tok, limits):
    seqs, ids, report = batching.encode_sft(tok, [LONG, SHORT], limits["max_length"], "drop")
    assert ids == ["s1"] and len(seqs) == 1
    assert report.rows == 2 and report.dropped == ["long1"] and report.truncated == []


def test_truncate_drops_a_row_whose_prompt_leaves_no_room(tok, limits):
    long_prompt = {"id": "p", "input": "질문 " * 40, "output": "답."}
    pp, _ = _lengths(tok, long_prompt["input"], long_prompt["output"])
    m = limits["max_length"]
    assert pp > m
    seqs, ids, report = batching.encode_sft(tok, [long_prompt, SHORT], m, "truncate")
    assert ids == ["s1"] and report.dropped == ["p"] and report.truncated == []


def test_rows_without_id_are_named_by_index(tok, limits):
    rows = [{"input": SHORT["input"], "output": SHORT["output"]},
            {"input": LONG["input"], "output": LONG["output"]}]
    _, ids, report = batching.encode_sft(tok, rows, limits["max_length"], "drop")
    assert ids == ["0"] and report.dropped == ["1"]


def _pair(pid, chosen, rejected, prompt="긴 답을 써 줘."):
    return {"id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_dpo_only_rejected_too_long_is_dropped_once(tok, limits):
    m = limits["max_length"]
    rows = [_pair("a", "짧다.", "짧지 않다."), _pair("b", "짧다.", LONG["output"]),
            _pair("c", LONG["output"], LONG["output"] + "끝.")]
    pairs, ids, report = batching.encode_dpo(tok, rows, m, "drop")
    assert ids == ["a"] and len(pairs) == 1
    assert report.rows == 3 and report.dropped == ["b", "c"] and report.truncated == []
    chosen, rejected = pairs[0]
    assert chosen.prompt == rejected.prompt


def test_dpo_truncate_counts_a_pair_once(tok, limits):
    m = limits["max_length"]
    rows = [_pair("a", "짧다.", LONG["output"]), _pair("b", LONG["output"], LONG["output"] + "끝.")]
    pairs, ids, report = batching.encode_dpo(tok, rows, m, "truncate")
    assert ids == ["a", "b"] and report.truncated == ["a", "b"] and report.dropped == []
    for chosen, rejected in pairs:
        assert len(chosen) <= m and len(rejected) <= m
    assert len(pairs[0][1]) == m and len(pairs[1][0]) == m == len(pairs[1][1])


def test_dpo_error_names_the_rejected_side(tok, limits):
    with pytest.raises(BatchError, match=r"row b: the rejected sequence"):
        batching.encode_dpo(tok, [_pair("a", "짧다.", "짧다!"), _pair("b", "짧다.", LONG["output"])],
                            limits["max_length"], "error")


@pytest.mark.parametrize("fn,row", [(batching.encode_sft, SHORT), (batching.encode_dpo, _pair("a", "x", "y"))])
def test_bad_policy_name(tok, fn, row):
    with pytest.raises(BatchError, match="skip"):
        fn(tok, [row], 100, "skip")


# ---------------------------------------------------------------------------------------------------
# epoch_batches: random slices, or length-grouped batches


def test_epoch_batches_without_grouping_are_slices_of_the_epoch_permutation():
    from kwjax import feed

    lengths = np.arange(10)
    got = feed.epoch_batches(3, 2, lengths, 4, group=0)
    perm = np.random.default_rng([3, 2]).permutation(10)  # the definition, written out
    assert [list(b) for b in got] == [list(perm[0:4]), list(perm[4:8]), list(perm[8:10])]


def test_epoch_batches_one_group_pairs_rows_of_like_length():
    from kwjax import feed

    lengths = np.array([5, 1, 4, 2, 3, 6])
    for epoch in range(4):  # one group holding every row: the batches are fixed, only their order moves
        got = feed.epoch_batches(0, epoch, lengths, 2, group=6)
        assert sorted(sorted(int(i) for i in b) for b in got) == [[0, 5], [1, 3], [2, 4]]


@pytest.mark.parametrize("group", [8, 16, 40])
def test_epoch_batches_grouped_cover_every_row_once_and_cut_padding(group):
    from kwjax import feed

    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=37)
    padded = {}
    for g in (0, group):
        total = 0
        for epoch in range(5):
            got = feed.epoch_batches(7, epoch, lengths, 4, group=g)
            assert sorted(int(i) for b in got for i in b) == list(range(37))
            assert [len(b) for b in got].count(1) == 1 and all(len(b) in (1, 4) for b in got)
            again = feed.epoch_batches(7, epoch, lengths, 4, group=g)  # a resumed run sees the same batches
            assert all(np.array_equal(a, b) for a, b in zip(got, again))
            total += sum(len(b) * lengths[b].max() for b in got)
        padded[g] = total
    assert padded[group] < 0.9 * padded[0]


def test_rows_seen_is_the_union_of_the_steps_batches():
    """A capped run's rows, from the epoch permutations written out: part of an epoch, then past one."""
    from kwjax import feed

    lengths = np.arange(10) % 4 + 1
    perm0 = np.random.default_rng([5, 0]).permutation(10)  # epoch 0: batches of 3, 3, 3, 1 rows
    np.testing.assert_array_equal(feed.rows_seen(5, lengths, 3, 0, 2), np.sort(perm0[:6]))
    np.testing.assert_array_equal(feed.rows_seen(5, lengths, 3, 0, 4), np.arange(10))
    np.testing.assert_array_equal(feed.rows_seen(5, lengths, 3, 0, 6), np.arange(10))  # into epoch 1
    # Grouped: groups of 6 sorted longest first, cut into batches of 3, the batches shuffled.
    grouped = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in (perm0[:6], perm0[6:])])
    first = np.random.default_rng([5, 0, 1]).permutation(4)[0]
    np.testing.assert_array_equal(feed.rows_seen(5, lengths, 3, 6, 1), np.sort(grouped[3 * first:3 * first + 3]))
