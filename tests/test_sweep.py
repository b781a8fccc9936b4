"""The sweep's grid parsing, config edits, point names, table and choice: small, hand-checked cases."""

import json

import ml_collections
import pytest

from kwjax import sweep


def _config():
    c = ml_collections.ConfigDict()
    c.sft = ml_collections.ConfigDict({"learning_rate": 2e-5})
    c.lora = ml_collections.ConfigDict({"rank": 0})
    c.freeze = ""
    return c


def test_parse_grid_reads_numbers_and_strings():
    grid = sweep.parse_grid(["sft.learning_rate=1e-5, 3e-5", "freeze=embedding,layer_0/"])
    assert grid == {"sft.learning_rate": [1e-5, 3e-5], "freeze": ["embedding", "layer_0/"]}


@pytest.mark.parametrize("item", ["sft.learning_rate", "=1,2", "lora.rank="])
def test_parse_grid_rejects_malformed(item):
    with pytest.raises(sweep.SweepError, match="KEY=VALUE"):
        sweep.parse_grid([item])


def test_parse_grid_rejects_empty():
    with pytest.raises(sweep.SweepError, match="empty"):
        sweep.parse_grid([])


def test_points_are_the_product_with_fields_set():
    pts = sweep.points(_config(), {"sft.learning_rate": [1, 3e-4], "lora.rank": [8, 16]})
    assert [p[0] for p in pts] == ["learning_rate=1_rank=8", "learning_rate=1_rank=16",
                                   "learning_rate=0.0003_rank=8", "learning_rate=0.0003_rank=16"]
    lr = pts[0][2].sft.learning_rate
    assert lr == 1.0 and isinstance(lr, float)  # an int given for a float field becomes a float
    assert pts[3][2].lora.rank == 16 and pts[3][2].sft.learning_rate == 3e-4


@pytest.mark.parametrize("key", ["sft.lr", "dpo.beta", "nosuch"])
def test_unknown_field_is_named(key):
    with pytest.raises(sweep.SweepError, match="no field"):
        sweep.points(_config(), {key: [1]})


def test_last_values_and_table_and_best(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0, "eval_loss": 3.5}, {"step": 3, "loss": 2.5}]) + "\n")
    assert sweep.last_values(path) == {"loss": 2.5, "eval_loss": 3.5}
    rows = [{"point": "a", "values": {"x": 1}, "seconds": 120.0, "last": {"eval_loss": 3.5, "gen_terminated": 0.25}},
            {"point": "b", "values": {"x": 2}, "seconds": 60.0, "last": {"eval_loss": 2.0, "gen_terminated": 0.75}},
            {"point": "c", "values": {"x": 3}, "seconds": 30.0, "last": {"loss": 1.0}}]
    md = sweep.table(rows).splitlines()
    assert md[0] == "| point | loss | eval_loss | gen_terminated | minutes |"
    assert md[2] == "| a |  | 3.5 | 0.25 | 2.0 |"
    assert md[4] == "| c | 1 |  |  | 0.5 |"
    assert sweep.best(rows, "eval_loss")["point"] == "b"
    assert sweep.best(rows, "gen_terminated")["point"] == "b"
    rows[0]["last"]["gen_seq_rep_4"], rows[1]["last"]["gen_seq_rep_4"] = 0.1, 0.4
    assert sweep.best(rows, "gen_seq_rep_4")["point"] == "a"
    with pytest.raises(sweep.SweepError, match="no sweep point logged"):
        sweep.best(rows, "eval_rewards/accuracies")
