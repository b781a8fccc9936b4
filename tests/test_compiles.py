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
