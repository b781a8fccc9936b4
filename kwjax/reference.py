"""The reference model's sequence log-probs, computed once over a split and cached on disk by content.

A DPO step then runs one model instead of two. The cache key is the data's and the reference
weights' fingerprints (plus the settings that change the numbers), so a changed file or a different
starting model never reuses stale values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from kwjax import distributed, feed, fingerprint, sharding
from kwjax import step as steplib
from kwjax.files import atomic_save_npy


def params_fingerprint(params) -> str:
    """Content hash of a params tree, whatever its sharding (multi-process: every process must call it)."""
    return fingerprint.digest_params(params, distributed.to_host)


def data_fingerprint(data: feed.Data) -> str:
    return fingerprint.digest_rows(data.ids, data.items, data.kind)


def cache_key(data: feed.Data, params, config, param_dtype) -> str:
    key = f"{data_fingerprint(data)}-{params_fingerprint(params)}-c{config.logprob_chunk}"
    cdtype = steplib.compute_dtype(config, param_dtype)
    return key + (f"-{cdtype.name}" if cdtype is not None else "")


def reference_logps(module, params, data: feed.Data, config, mesh, cache_root: Path | None, desc: str, *,
                    rows: Sequence[int] | None = None,
                    on_batch: Callable[[int, float], None] | None = None) -> np.ndarray:
    """[N, 2] (chosen, rejected) sequence log-probs of the reference `params` (a full tree).

    `rows`: only these rows are needed (a run capped below an epoch reads only some); the others stay
    NaN unless the cache already holds them. A cache file keeps every row any run computed, and is
    reused when it holds all the rows asked for.

    Multi-process: every process computes its rows of every batch; the log-probs come back replicated,
    so every process holds all [N, 2]. Only process 0 reads and writes the cache (its disk), and tells
    the others whether it found the values, so all processes run the same collectives. `on_batch(i,
    seconds)` sees each batch's time (the benchmark's hook).
    """
    import time

    from tqdm import tqdm

    path = None
    if cache_root is not None:
        path = cache_root / f"{cache_key(data, params, config, module.param_dtype)}.npy"
    n = len(data.items)
    needed = np.arange(n) if rows is None else np.unique(np.asarray(rows, np.int64))
    found = np.load(path) if path is not None and distributed.is_main() and path.is_file() else None
    complete = found is not None and found.shape == (n, 2) and bool(np.isfinite(found[needed]).all())
    if distributed.any_process(complete):  # process 0 holds every needed row: everyone takes its values
        return distributed.broadcast(found if complete else np.zeros((n, 2)))
    cdtype = steplib.compute_dtype(config, module.param_dtype)
    # steplib.forward_logps looked up at trace time: a test counts the traces of a cache hit (none)
    fwd = jax.jit(lambda p, b: steplib.forward_logps(module, steplib.cast(p, cdtype), b,
                                                     config.logprob_chunk).logps_B,
                  out_shardings=sharding.replicated(mesh))
    bsz = config.batch_size
    out = np.full((n, 2), np.nan, np.float64)
    chunks = [needed[s:s + bsz].tolist() for s in range(0, len(needed), bsz)]
    for i, idx in enumerate(tqdm(chunks, desc=desc, unit="batch", leave=False,
                                 disable=not distributed.is_main())):
        batch = feed.global_batch(data, idx, config, mesh)
        t = time.perf_counter()
        logps = np.asarray(fwd(params, batch))
        if on_batch is not None:
            on_batch(i, time.perf_counter() - t)
        out[idx, 0] = logps[:len(idx)]
        out[idx, 1] = logps[bsz:bsz + len(idx)]
    if found is not None and found.shape == out.shape:  # keep the rows an earlier run computed
        out = np.where(np.isnan(out), found, out)
    if path is not None and distributed.is_main():
        atomic_save_npy(path, out)
    return out
