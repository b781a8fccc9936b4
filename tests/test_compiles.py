"""The compile counter sees each new shape once and a cached one not at all."""

import jax
import jax.numpy as jnp
import numpy as np

from kwjax.compiles import Counter


def test_counts_new_shapes_only():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    a3, a5, a7 = (np.ones(n, np.float32) for n in (3, 5, 7))  # host arrays: no compile to make them
    counter = Counter.start()
    f(a3).block_until_ready()
    f(a5).block_until_ready()
    assert counter.count == 2 and counter.seconds > 0
    f(a3).block_until_ready()
    assert counter.count == 2
    later = Counter.start()
    f(a7).block_until_ready()
    assert (later.count, counter.count) == (1, 3)
    assert later.as_timings()["xla_compiles"] == 1


_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from kwjax.compiles import Counter, use_disk_cache
where = use_disk_cache(min_compile_seconds=0.0)
counter = Counter.start()
out = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ x.T, axis=0))(np.ones((4, 3), np.float32))
print(json.dumps({"where": where, "compiles": counter.count, "hits": counter.hits, "value": float(out.sum())}))
"""


def _run_program(env):
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_program_from_the_disk_cache(tmp_path):
    """The counter then reports no compile: experiment.json's xla_compiles counts real compilations."""
    env = {"KWJAX_XLA_CACHE": str(tmp_path / "xla")}
    first, second = _run_program(env), _run_program(env)
    assert first["where"] == str(tmp_path / "xla") and first["compiles"] >= 1
    assert any((tmp_path / "xla").iterdir())
    assert first["hits"] == 0
    assert second["compiles"] == 0 and second["hits"] == first["compiles"] and second["value"] == first["value"]
    off = _run_program({"KWJAX_XLA_CACHE": "0"})
    assert off["where"] is None and off["compiles"] >= 1
