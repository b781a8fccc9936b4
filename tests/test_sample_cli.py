"""scripts/sample.py end to end on the embedded model, and its input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


@pytest.mark.real_weights
def test_prompts_file_to_jsonl(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "바다"}\n\n{"prompt": "The sea"}\n{"prompt": "Rain"}\n', encoding="utf-8")
    out = tmp_path / "o.jsonl"
    r = run("--prompts_file", str(prompts), "--output", str(out), "--greedy", "--max_new_tokens=6",
            "--batch_size=2", "--chat")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["바다", "The sea", "Rain"]
    for row in rows:
        assert set(row) == {"prompt", "text", "tokens", "logprobs", "stop_reason"}
        assert 0 < len(row["tokens"]) <= 6 and len(row["logprobs"]) == len(row["tokens"])
        assert all(lp <= 0 for lp in row["logprobs"])


@pytest.mark.parametrize("args,message", [
    (["--prompt", "hi", "--max_new_tokens=0"], "max_new_tokens must be positive"),
    (["--prompt", "   ", "--model", "gemma3-270m"], "prompt 0 is empty"),
    (["--prompt", "hi", "--model", "/nonexistent/model"], "/nonexistent/model: no such file or directory"),
    (["--prompt", "hi", "--top_p=1.5"], "top_p must be in"),
])
def test_bad_input_is_a_clear_error(args, message):
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_prompts_file_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    r = run("--prompts_file", str(f))
    assert r.returncode == 2 and f"{f}:2: expected an object" in r.stderr, r.stderr


@pytest.mark.real_weights
def test_top_tokens_cli():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "top_tokens.py"), "--prompt", "The capital of France is",
                        "--k", "5"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "id", "logprob", "token"] and len(lines) == 6
    logprobs = [float(line.split()[2]) for line in lines[1:]]
    assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
    assert any("Paris" in line for line in lines[1:])  # a working 270M ranks it third here
