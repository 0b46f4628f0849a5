"""Independent trials (spa sensitivity, spa sweep) as Ray tasks, or one after another.

With ``ray`` importable: a local Ray started for the call (every core, no dashboard) or, with
``address``, an existing cluster joined; the shared inputs (the model, the metric's arrays) go
through the object store once (``ray.put``) and every trial is a task reading them. Without Ray:
a serial loop, announced in one line.

Every trial runs without progress bars and with one thread (numpy/scipy BLAS, OpenMP, torch and
onnxruntime sessions), serially too: parallel workers on a few cores would otherwise thrash, and a
result does not depend on where it ran.

A trial that raises, or whose worker dies (Ray retries a dead worker's task by itself first), is
submitted again up to ``retries`` times; one still failing is returned as ``{"error": one line}``
and announced, and the other trials finish.
"""
from __future__ import annotations

import contextlib
import os

from .errors import SpaError, first_line

RETRIES = 2
CONNECT_SECONDS = 10  # --address: how long the cluster's port may take to accept a connection
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def _quiet(message):
    pass


@contextlib.contextmanager
def one_thread():
    """BLAS and OpenMP pools (loaded or loaded later), torch's intra-op pool and onnxruntime
    sessions at one thread."""
    import sys

    from threadpoolctl import threadpool_limits

    from . import runtime

    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: "1" for name in THREAD_VARIABLES})
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch else None
    ort_threads, runtime.DEFAULT_THREADS = runtime.DEFAULT_THREADS, 1
    try:
        with threadpool_limits(1):
            if torch:
                torch.set_num_threads(1)
            yield
    finally:
        runtime.DEFAULT_THREADS = ort_threads
        if torch:
            torch.set_num_threads(torch_threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _single_threaded(fn):
    def trial(shared, item):
        from . import progress

        with one_thread(), progress.showing(False):
            return fn(shared, item)
    trial.__qualname__ = trial.__name__ = getattr(fn, "__name__", "trial")
    return trial


def check_address(address: str | None) -> None:
    """--address: Ray installed and the value spelled like an address, before any work."""
    if address is None:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SpaError("--address needs Ray (pip install 'spa[ray]')") from None
    host, sep, port = address.rpartition(":")
    if address != "auto" and not address.startswith("ray://") and not (sep and host and port.isdigit()):
        raise SpaError(f"--address {address!r}: expected HOST:PORT of a Ray cluster (or auto, or ray://HOST:PORT)")


def run_trials(fn, shared, items: list, address: str | None = None, note=_quiet, say=_quiet,
               retries: int = RETRIES) -> tuple[list, str]:
    """([fn(shared, item) or {"error": line} for item in items], "ray" | "serial") (see the
    module's doc)."""
    try:
        import ray
    except ImportError:
        if address:
            raise SpaError("--address needs Ray (pip install 'spa[ray]')") from None
        note(f"Ray not installed (pip install 'spa[ray]'); running {len(items)} trials serially")
        return _serial(_single_threaded(fn), shared, items, note, retries), "serial"
    with _cluster(ray, address):
        say(f"running {len(items)} trials as Ray tasks" + (f" on {address}" if address else ""))
        return _on_ray(ray, _single_threaded(fn), shared, items, note, retries), "ray"


@contextlib.contextmanager
def _cluster(ray, address):
    """Ray ready for tasks: the one already initialised, else a local one (or `address` joined),
    shut down after."""
    if ray.is_initialized():
        if address:
            raise SpaError(f"cannot join the Ray cluster at {address}: this process is connected to Ray already "
                           "(ray.shutdown() first, or give no address to use that one)")
        yield
        return
    try:
        if address:
            _reachable(address)
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except Exception as exc:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise SpaError(f"cannot {where} ({first_line(exc)})") from None
    try:
        yield
    finally:
        ray.shutdown()


def _reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) where nothing listens fails now: ray.init would retry it
    for minutes."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not port.isdigit():
        return
    with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
        pass


def _serial(fn, shared, items, note, retries) -> list:
    from . import progress

    results = []
    for item in progress.bar(items, desc="trials", total=len(items)):
        for attempt in range(retries + 1):
            try:
                results.append(fn(shared, item))
                break
            except Exception as exc:
                if attempt == retries:
                    results.append(_failed(item, exc, retries, note))
    return results


def _on_ray(ray, fn, shared, items, note, retries) -> list:
    from . import progress

    remote, ref = ray.remote(fn), ray.put(shared)
    pending = {remote.remote(ref, item): i for i, item in enumerate(items)}
    attempts, results = [0] * len(items), [None] * len(items)
    with progress.bar(desc="trials", total=len(items)) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
            except Exception as exc:
                attempts[i] += 1
                if attempts[i] <= retries:
                    pending[remote.remote(ref, items[i])] = i
                    continue
                results[i] = _failed(items[i], exc, retries, note)
            bar.update(1)
    return results


def _failed(item, exc, retries, note) -> dict:
    line = first_line(_cause(exc))
    note(f"trial {item} failed {retries + 1} times; last: {line}")
    return {"error": line}


def _cause(exc):
    return getattr(exc, "cause", None) or exc

