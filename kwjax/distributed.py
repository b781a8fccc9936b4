"""Multi-process runs (a Cloud TPU slice, several hosts, or several processes on one machine).

kwjax runs on JAX's own multi-controller runtime: every process runs the same program on its own
devices, `jax.devices()` lists the devices of all of them, and a jitted step over a global
`jax.sharding.Mesh` is one SPMD program. This module is the little that changes:

* `initialize()` starts the runtime (`jax.distributed.initialize`) when a run is multi-process:
  explicitly (`--distributed`, `KWJAX_DISTRIBUTED=1`: auto-detected on Cloud TPU, SLURM, Open MPI)
  or from `KWJAX_COORDINATOR` / `KWJAX_NUM_PROCESSES` / `KWJAX_PROCESS_ID` (any machines, e.g. CPU
  processes on one host with a coordinator on 127.0.0.1).
* `global_batch()` builds a global batch from process-local rows: each process collates and transfers
  only the rows its own devices hold (`process_rows`), in the global batch's order.
* `to_host()`, `broadcast()`, `all_equal()`, `any_process()`: host values from sharded arrays and small
  agreements between processes. All of them are collectives: every process must call them, in the
  same order, or the run hangs.
* `is_main()`: process 0 writes logs, metrics, reports and exports; Orbax checkpoints are written by
  all processes together.

In a one-process run every helper reduces to the plain single-process operation.
"""

from __future__ import annotations

import logging
import os
import secrets
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np

from kwjax import fingerprint

log = logging.getLogger(__name__)

ENV_DISTRIBUTED = "KWJAX_DISTRIBUTED"
ENV_COORDINATOR = "KWJAX_COORDINATOR"
ENV_NUM_PROCESSES = "KWJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "KWJAX_PROCESS_ID"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class DistributedError(RuntimeError):
    """A multi-process set-up that cannot work: bad settings, or processes that disagree."""


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise DistributedError(f"${name}={os.environ[name]!r}: expected 1/true/yes/on or 0/false/no/off")


def _explicit_settings() -> dict | None:
    """coordinator_address / num_processes / process_id from KWJAX_*, or None when none is set."""
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    values = {n: os.environ.get(n, "").strip() for n in names}
    if not any(values.values()):
        return None
    missing = [n for n, v in values.items() if not v]
    if missing:
        raise DistributedError(f"{', '.join('$' + n for n in missing)} not set: a multi-process run configured "
                               f"by environment needs all of ${ENV_COORDINATOR} (host:port of process 0), "
                               f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID}")
    try:
        num, pid = int(values[ENV_NUM_PROCESSES]), int(values[ENV_PROCESS_ID])
    except ValueError:
        raise DistributedError(f"${ENV_NUM_PROCESSES}={values[ENV_NUM_PROCESSES]!r} and ${ENV_PROCESS_ID}="
                               f"{values[ENV_PROCESS_ID]!r} must be integers") from None
    if num < 1 or not 0 <= pid < num:
        raise DistributedError(f"${ENV_PROCESS_ID}={pid} must lie in [0, ${ENV_NUM_PROCESSES}={num})")
    if ":" not in values[ENV_COORDINATOR]:
        raise DistributedError(f"${ENV_COORDINATOR}={values[ENV_COORDINATOR]!r}: expected host:port of process 0")
    return {"coordinator_address": values[ENV_COORDINATOR], "num_processes": num, "process_id": pid}


def _initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)  # absent from older JAX: read its state
    if check is not None:
        return bool(check())
    from jax._src import distributed as _state

    return _state.global_state.client is not None


def initialize(enabled: bool | None = None) -> bool:
    """Starts JAX's multi-process runtime if this run is multi-process; True when it is (or already was).

    `enabled`: True (`--distributed`) initializes, from the KWJAX_* variables when they are set, else by
    JAX's auto-detection (Cloud TPU VMs, SLURM, Open MPI); False never does; None (default) decides
    from the environment: KWJAX_COORDINATOR/KWJAX_NUM_PROCESSES/KWJAX_PROCESS_ID, or KWJAX_DISTRIBUTED=1.
    Must run before anything touches a JAX backend (no jax.devices(), no arrays).
    """
    if _initialized():
        return True
    explicit = _explicit_settings()
    if enabled is None:
        enabled = explicit is not None or _env_flag(ENV_DISTRIBUTED)
    if not enabled:
        return False
    # Cross-process collectives of the CPU backend (tests, CPU clusters); TPU and GPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**(explicit or {}))
    except (RuntimeError, ValueError) as e:  # no coordinator reachable, nothing auto-detected, ...
        how = (f"coordinator {explicit['coordinator_address']}, process {explicit['process_id']} of "
               f"{explicit['num_processes']}" if explicit else "auto-detected (Cloud TPU, SLURM, Open MPI)")
        raise DistributedError(f"jax.distributed.initialize failed ({how}): {e}") from e
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_main() -> bool:
    """Process 0: the one that logs, writes metrics and reports, and exports the final model."""
    return jax.process_index() == 0


# ---- global batches from process-local rows ---------------------------------------------------------------


def process_rows(mesh, n_rows: int) -> np.ndarray:
    """The rows of a [n_rows, ...] batch that this process's devices hold, in the order that
    `jax.make_array_from_process_local_data` expects them (its shards sorted by position).

    Rows are split over the mesh's batch axes; a process whose devices replicate rows (a `tensor` axis)
    holds each of them once. With one process: all rows, in order.
    """
    from kwjax.sharding import batch_sharding

    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((n_rows,))
    starts = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else n_rows)
                     for idx in index_map.values()})
    if not starts:
        return np.zeros((0,), np.int64)
    return np.concatenate([np.arange(a, b) for a, b in starts])


def global_batch(mesh, host: dict[str, np.ndarray], n_rows: int) -> dict[str, jax.Array]:
    """{name: [n_rows, ...] global array sharded over the batch axes} from this process's rows.

    `host[name]` holds the rows `process_rows(mesh, n_rows)` in that order; the other dimensions are the
    global ones (every process pads to the same lengths).
    """
    from kwjax.sharding import batch_sharding

    out = {}
    for name, value in host.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value,
                                                           (n_rows, *value.shape[1:]))
    return out


def put_global(tree, shardings):
    """Places a pytree with the given shardings, each process supplying the shards of its own devices.

    Leaves may be host arrays or fully addressable jax.Arrays holding the whole value (every process
    holds the same one, e.g. weights each process loaded itself), or global arrays (resharded). With one
    process this is `jax.device_put`. Unlike `device_put`, no cross-process equality check (an all-gather
    of every parameter) runs: `all_equal(fingerprints...)` is the cheap check.
    """
    if not is_multiprocess():
        return jax.device_put(tree, shardings)

    def place(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == sharding else jax.device_put(x, sharding)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


# ---- host values and agreements -------------------------------------------------------------------------------


def to_host(tree) -> Any:
    """Numpy copies of every leaf, whole, on every process (a collective for arrays spread over processes)."""

    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def _transportable(x) -> np.ndarray:
    """JAX carries no 64-bit values without x64: narrow them, refusing any loss of precision."""
    x = np.asarray(x)
    narrow = {np.dtype(np.float64): np.float32, np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32,
              np.dtype(np.bool_): np.int32}.get(x.dtype)
    if narrow is None:
        return x
    out = x.astype(narrow)
    if not np.array_equal(out.astype(x.dtype), x):
        raise DistributedError(f"cannot carry these {x.dtype} values between processes without losing precision")
    return out


def broadcast(tree) -> Any:
    """Process 0's values of a pytree of host arrays (same shapes and dtypes on every process)."""
    if not is_multiprocess():
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, tree)
    out = multihost_utils.broadcast_one_to_all(jax.tree.map(_transportable, tree))
    return jax.tree.map(lambda x, d: np.asarray(x).astype(d), out, dtypes)


def gather_values(value) -> np.ndarray:
    """[process_count, ...]: one small host value from every process, on every process."""
    value = _transportable(value)
    if not is_multiprocess():
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value)).reshape(jax.process_count(), *value.shape)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any of them (e.g. a signal that reached one host)."""
    if not is_multiprocess():
        return bool(flag)
    return bool(gather_values(np.int32(bool(flag))).any())


def digest(data: bytes | str) -> np.ndarray:
    """A 128-bit fingerprint of host data as int32[4], for `all_equal`."""
    if isinstance(data, str):
        data = data.encode()
    return np.frombuffer(bytes.fromhex(fingerprint.digest_bytes_iter([data], 16)), np.int32).copy()


def params_digests(params) -> dict[str, np.ndarray]:
    """{path: int32[2] checksum and size} of the leaves this process holds whole; cheap (adler32)."""
    out = {}
    for keys, leaf in jax.tree_util.tree_leaves_with_path(params):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            continue  # already a global array: nothing process-local to compare
        host = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        checksum = zlib.adler32(host.reshape(-1).view(np.uint8))  # any dtype, bfloat16 included
        out[jax.tree_util.keystr(keys)] = np.array([checksum, host.size & 0xFFFFFFFF], np.uint32).view(np.int32)
    return out


def all_equal(values: dict[str, np.ndarray], what: str) -> None:
    """Raises (on every process) unless each named int32 array is the same on all processes."""
    if not is_multiprocess() or not values:
        return
    names = sorted(values)
    sizes = np.cumsum([0] + [np.asarray(values[n]).size for n in names])
    everyone = gather_values(np.concatenate([np.asarray(values[n], np.int32).ravel() for n in names]))
    differs = everyone != everyone[:1]
    if not differs.any():
        return
    names_off = [n for n, a, b in zip(names, sizes[:-1], sizes[1:]) if differs[:, a:b].any()]
    processes = [int(p) for p in np.nonzero(differs.any(axis=1))[0]]
    raise DistributedError(f"{what} differ between processes ({', '.join(names_off[:5])}: processes {processes} "
                           "disagree with process 0); every process must run the same command on the same files")


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_shared_dir(directory: str | Path, what: str) -> None:
    """Raises on every process unless `directory` is one filesystem location that all processes see.

    Orbax writes a checkpoint from all processes into one directory; on a multi-host slice a local
    path on each host's own disk would leave every host with a fragment. URLs (gs://...) are shared.
    """
    if not is_multiprocess() or "://" in str(directory):
        return
    directory = Path(directory)
    token = int(broadcast(np.int32(secrets.randbits(31) if is_main() else 0)))
    probe = directory / f".kwjax-shared-{token}"
    if is_main():
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(token))
    barrier(f"kwjax-shared-probe-written-{token}")
    try:
        seen = probe.read_text() == str(token)
    except OSError:
        seen = False
    everyone = gather_values(np.int32(seen))
    barrier(f"kwjax-shared-probe-read-{token}")
    if is_main():
        probe.unlink(missing_ok=True)
    if not everyone.all():
        missing = [int(p) for p in np.nonzero(everyone == 0)[0]]
        raise DistributedError(f"{what} {directory} is not shared by all processes (processes {missing} do not "
                               "see what process 0 wrote there): on a multi-host slice put it on storage every "
                               "host mounts, or pass a gs://BUCKET/... path (see docs/TPU.md)")
