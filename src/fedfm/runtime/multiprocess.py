"""Parallel clients: the in-process runtime's work spread over worker processes forked from this one.

``MultiProcessRuntime(trainer, pipeline, workers)`` has the interface of InProcessRuntime and
gives its results: each worker runs the same ``train_client`` on its copy of the shared model,
the parent keeps every client's pipeline state and builds the results with ``result_from_wire``.

How it works:
    - Workers are forked (start method "fork", Linux) when the runtime is made, after the
      experiment is built, so they inherit the model, the encoded data pool, the trainer and the
      pipeline without pickling anything. Before the first fork the model's frozen parameters
      and buffers are moved to shared memory (``Tensor.share_memory_``): every worker maps the
      same pages, which are never copied per process, even when written. The trainable
      parameters (what ``ModelHandle.set_params`` overwrites per task) stay private to each
      process, copy-on-write. Buffers of normalization layers with running statistics
      (BatchNorm) are left private as well: training updates them in place.
    - Each worker runs one torch thread (``torch.set_num_threads(1)``): on this 2-core machine,
      N workers x 1 thread, and the parent waits while they train. This is also what makes
      forking safe at any time: torch here uses GNU OpenMP, whose thread pool does not survive a
      fork. Checked empirically (torch 2.13 CPU): after the parent ran OpenMP-parallel ops with 2
      threads (matmul, layer_norm, softmax; as the round-0 evaluation does), a forked child that
      keeps 2 threads, or sets 2, hangs on its first parallel op; one that sets 1 thread runs
      them, and the workers here train bit-identically to the in-process runtime. So workers may
      be forked (and replaced) after any amount of parent work, and must never raise their
      thread count.
    - Per task the parent sends the task (its params wire-encoded once per distinct params
      object, and sent to each worker once per run), and the client's pipeline state
      (wire-encoded bytes, so no tensor is pickled); the worker replies with the ClientReply's
      payload bytes, metrics and new state bytes. Tasks are dispatched dynamically: a worker takes
      the next task as soon as it is free.

Guarantees:
    - ``run`` returns the results in task order, equal bit for bit to InProcessRuntime's for the
      same tasks when both train with one thread (``runtime.threads=1``; with more threads CPU
      kernels may reduce in another order): training depends only on the task (its params and
      seed) and the client's state. The clients' states end up the same too.
    - ``on_result`` is called in task order, each result as soon as it and every earlier one are
      in (the same order and count as in-process, still streaming as the round goes). Each
      client's state is updated just before its ``on_result`` call, as in-process: the states'
      dict order is the same, and an interrupted run keeps exactly the states of the results it
      delivered.
    - A worker that dies (killed, ``os._exit``, out of memory) never hangs the parent: its
      client's result has ``error="worker died: ..."`` and no update, and a fresh worker is
      forked in its place before the next task is handed out (in this round or a later one).
    - An exception inside ``train_client`` becomes that client's error
      (``"ExceptionType: message"``), logged with its traceback; the run goes on.
    - A client that errs or whose worker dies keeps its previous pipeline state.
    - No orphan processes: ``close()`` (or leaving the ``with`` block) stops and reaps the
      workers; a runtime that is garbage collected or still open at interpreter exit is closed
      by a finalizer; workers are daemonic (multiprocessing terminates them when the parent
      exits normally) and exit on their own when the parent dies (their pipe reaches EOF).
    - If ``run`` is interrupted (an exception in ``on_result``, KeyboardInterrupt), the workers
      busy with its tasks are terminated; fresh ones are forked for the next run. Workers ignore
      SIGINT: Ctrl-C reaches the parent, which stops them.

Limits: the trainer and the pipeline are snapshots taken at fork; what changes per round must
travel in the task (as everything in-tree does: params, seed, payload). Trainer state that
persists from one task to the next inside a process (other than the model's trainable params,
which every task overwrites) is per worker; the in-tree trainers keep none. A task sent to a
worker that dies before replying fails, whatever killed the worker. CPU only: a CUDA context does
not survive a fork. Each worker trains one task at a time, so a trainer that batches many clients
in one ``train_many`` call gains nothing here.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import signal
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Callable, MutableMapping, Optional, Sequence

from fedfm import wire
from fedfm.pipeline import UpdatePipeline
from fedfm.runtime.client import download_bytes, result_from_wire, train_client
from fedfm.trainers.base import ClientTrainer
from fedfm.types import ClientResult, ClientTask

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fedfm.runtime")

_STOP = None  # the message that asks a worker to exit
_KEEP = object()  # a client's state stays as it was (its turn failed)
_JOIN_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Worker:
    """One worker process and the parent's end of its pipe."""

    process: Any  # multiprocessing.context.ForkProcess
    conn: Connection
    task: Optional[int] = None  # index of the task it is training, if busy
    sent: set = field(default_factory=set)  # (run, params key) blobs it already holds


class MultiProcessRuntime:
    """Clients trained in parallel by ``workers`` forked processes.

    Args:
        trainer: trains any client on the shared model (e.g. LocalTrainer); inherited by the
            workers at fork. When it has a ``handle.model`` (a torch module), the module's frozen
            weights are put in shared memory before forking.
        pipeline: the client side of the update pipeline.
        workers: number of worker processes (>= 1).
        client_states: client id -> pipeline state, kept in this process (a dict, or a
            fedfm.runtime.store.ClientStateStore for very many clients); a new dict when None.
    """

    streams_results = True
    """Results go to ``on_result`` in task order as they arrive; the runtime keeps what it returns."""

    def __init__(self, trainer: ClientTrainer, pipeline: Optional[UpdatePipeline] = None, workers: int = 2,
                 client_states: "Optional[MutableMapping[int, dict[str, torch.Tensor]]]" = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.trainer = trainer
        self.pipeline = pipeline if pipeline is not None else UpdatePipeline()
        self.workers = workers
        self.client_states: "MutableMapping[int, dict[str, torch.Tensor]]" = \
            client_states if client_states is not None else {}
        self._ctx = multiprocessing.get_context("fork")
        self._slots: list[Optional[_Worker]] = [None] * workers
        self._runs = itertools.count()
        self._closed = False
        model = getattr(getattr(trainer, "handle", None), "model", None)
        self.shared_bytes = share_frozen_weights(model) if model is not None else 0
        """Bytes of frozen weights moved to shared memory (0 when the trainer has no model)."""
        self._finalizer = weakref.finalize(self, _shutdown, self._slots, os.getpid())
        for i in range(workers):
            self._slots[i] = self._spawn(i)

    # ------------------------------------------------------------------ public

    def run(
        self, tasks: Sequence[ClientTask],
        on_result: "Optional[Callable[[ClientResult], Optional[ClientResult]]]" = None,
    ) -> list[ClientResult]:
        """Train every task on the workers; results (and ``on_result`` calls) in task order."""
        if self._closed:
            raise RuntimeError("MultiProcessRuntime is closed")
        run_id = next(self._runs)
        blobs = _Broadcasts()  # the broadcast is encoded once per distinct params object
        task_key = [blobs.add(task.params) for task in tasks]
        # per task: its result and the client's new state (_KEEP: leave it), once the reply is in
        results: list[Optional[tuple[ClientResult, Any]]] = [None] * len(tasks)
        # a client listed twice trains its second task after its first one's state is kept, as
        # in-process (cohorts are distinct clients, so this never waits in a round)
        earlier: list[int] = []
        last: dict[int, int] = {}
        for i, task in enumerate(tasks):
            earlier.append(last.get(task.client_id, -1))
            last[task.client_id] = i
        todo = deque(range(len(tasks)))
        out: list[ClientResult] = []
        try:
            while len(out) < len(tasks):
                self._dispatch(todo, tasks, blobs, task_key, run_id, results, earlier, len(out))
                self._collect(tasks, blobs, task_key, results)
                while len(out) < len(tasks) and results[len(out)] is not None:
                    # states are kept in task order, as in-process: same dict order, and an
                    # interrupted run keeps exactly the states of the results it delivered
                    result, state = results[len(out)]  # type: ignore[misc]
                    results[len(out)] = None
                    if state is not _KEEP:
                        if state:
                            self.client_states[result.client_id] = state
                        else:
                            self.client_states.pop(result.client_id, None)
                    if on_result is not None:
                        returned = on_result(result)
                        result = returned if isinstance(returned, ClientResult) else result
                    out.append(result)
        except BaseException:
            self._abandon_busy()
            raise
        return out

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.process.pid for w in self._slots if w is not None and w.process.is_alive()]

    def close(self) -> None:
        """Stop the workers and reap them (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "MultiProcessRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ dispatch

    # Hand-written scheduling: multiprocessing.Pool hangs forever on a task whose worker died, and
    # concurrent.futures.ProcessPoolExecutor fails every pending task of the pool (BrokenProcessPool)
    # when one worker dies; neither isolates a crash to the one client that caused it.

    def _spawn(self, slot: int) -> _Worker:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        # the child closes every parent end it inherits (its own and other workers'), so that it
        # sees EOF, and exits, when the parent dies
        inherited = [parent_end] + [w.conn for w in self._slots if w is not None]
        process = self._ctx.Process(target=_serve, args=(child_end, self.trainer, self.pipeline, inherited),
                                    name=f"fedfm-worker-{slot}", daemon=True)
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def _dispatch(self, todo: deque, tasks: Sequence[ClientTask], blobs: "_Broadcasts", task_key: list[int],
                  run_id: int, results: list, earlier: list[int], delivered: int) -> None:
        """Hand the next tasks to the idle workers, replacing dead ones first. A task waits
        while an earlier task of the same client is not delivered yet."""
        for slot in range(self.workers):
            i = next((j for j in todo if earlier[j] < delivered), None)
            if i is None:
                return
            w = self._slots[slot]
            if w is not None and w.task is None and not w.process.is_alive():
                _terminate(w)  # died while idle (e.g. killed between rounds)
                _release(w)
                w = None
            if w is None:
                w = self._slots[slot] = self._spawn(slot)
            if w.task is not None:
                continue
            todo.remove(i)
            task, key = tasks[i], (run_id, task_key[i])
            state = self.client_states.get(task.client_id)
            shared = blobs.shared(task_key[i])  # one client's own params (downlink replicas) are not kept
            message = (key, None if key in w.sent else blobs.blob(task_key[i]), replace(task, params={}),
                       None if state is None else wire.encode(state), shared)
            try:
                w.conn.send(message)
            except (OSError, ValueError) as e:  # the worker died between the liveness check and the send
                down = download_bytes(task, blobs.sizes[task_key[i]])
                results[i] = (self._failure(task, down, _death(w, e)), _KEEP)
                self._slots[slot] = None
                continue
            w.sent = {k for k in w.sent if k[0] == run_id} | ({key} if shared else set())
            w.task = i

    def _collect(self, tasks: Sequence[ClientTask], blobs: "_Broadcasts", task_key: list[int],
                 results: list) -> None:
        """Wait until at least one busy worker replies or dies, and record what came back."""
        busy = [w for w in self._slots if w is not None and w.task is not None]
        if not busy:
            return
        ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
        for w in busy:
            if w.conn not in ready and w.process.sentinel not in ready:
                continue
            i = w.task
            assert i is not None
            task, down = tasks[i], download_bytes(tasks[i], blobs.sizes[task_key[i]])
            reply, reason = None, None
            try:
                if w.conn.poll():  # a reply (even from a worker that exited right after sending)
                    reply = w.conn.recv()
            except Exception as e:  # EOF or a reply cut off by the worker's death
                reason = _death(w, e)
            if reply is None:
                results[i] = (self._failure(task, down, reason or _death(w, None)), _KEEP)
                self._slots[self._slots.index(w)] = None  # replaced at the next dispatch
                continue
            w.task = None
            results[i] = self._receive(task, down, reply)

    def _receive(self, task: ClientTask, bytes_down: int, reply: tuple) -> tuple[ClientResult, Any]:
        """The parent's half of a client's turn: its result, built as InProcessRuntime._client_turn
        does, and its new state (None: drop it; _KEEP: leave it as it is)."""
        up, metrics, state_bytes, error, crash = reply
        if crash is not None:
            message, tb = crash
            log.warning("client %d failed in a worker:\n%s", task.client_id, tb)
            return self._failure(task, bytes_down, message), _KEEP
        state = wire.decode(state_bytes) if state_bytes is not None else None
        if up is None:
            return ClientResult(client_id=task.client_id, update=None, metrics=metrics, bytes_up=0,
                                bytes_down=bytes_down, error=error), state
        return result_from_wire(task.client_id, up, metrics, bytes_down), state

    @staticmethod
    def _failure(task: ClientTask, bytes_down: int, error: str) -> ClientResult:
        return ClientResult(client_id=task.client_id, update=None, metrics={}, bytes_up=0, bytes_down=bytes_down,
                            error=error)

    def _abandon_busy(self) -> None:
        """After an interrupted run: stop the workers still training its tasks (their replies
        would otherwise arrive during the next run); fresh ones are forked on demand."""
        for slot, w in enumerate(self._slots):
            if w is not None and w.task is not None:
                _terminate(w, grace=0.0)
                _release(w)
                self._slots[slot] = None


class _Broadcasts:
    """A run's distinct params objects (one broadcast, or one per client with downlink
    compression), each encoded when first sent. Only a broadcast that several tasks share is kept
    encoded, here and in the workers; a client's own params are sent once and dropped."""

    def __init__(self) -> None:
        self.params: list = []
        self.sizes: list[int] = []  # encoded sizes (wire.encoded_size: no encoding needed)
        self.uses: list[int] = []
        self._key: dict[int, int] = {}
        self._blobs: dict[int, bytes] = {}

    def add(self, params: Any) -> int:
        """The key of ``params`` (by identity), added if new."""
        k = self._key.get(id(params))
        if k is None:
            k = self._key[id(params)] = len(self.params)
            self.params.append(params)
            self.sizes.append(wire.encoded_size(params))
            self.uses.append(0)
        self.uses[k] += 1
        return k

    def shared(self, k: int) -> bool:
        return self.uses[k] > 1

    def blob(self, k: int) -> bytes:
        blob = self._blobs.get(k)
        if blob is None:
            blob = wire.encode(self.params[k])
            if self.shared(k):
                self._blobs[k] = blob
        return blob


def share_frozen_weights(model: Any) -> int:
    """Move ``model``'s frozen parameters and its buffers to shared memory, in place (every
    tensor viewing them, tied weights included, follows); returns the bytes moved.

    Skipped: trainable parameters and anything sharing their storage (each worker writes its
    own), buffers of normalization layers with running statistics (training updates them in
    place), non-CPU tensors and tensors already shared. If the system refuses shared memory
    (e.g. a small /dev/shm), the rest stays as it is and fork's copy-on-write still shares the
    pages as long as nobody writes them.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        return 0
    private = {p.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            private.update(b.untyped_storage().data_ptr() for b in m.buffers(recurse=False))
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    moved, done = 0, set()
    for t in frozen:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if t.device.type != "cpu" or ptr in private or ptr in done or not storage.nbytes() or t.is_shared():
            continue
        try:
            t.share_memory_()
        except RuntimeError as e:
            log.warning("frozen weights stay private to each worker (copy-on-write): %s", e)
            break
        done.add(t.untyped_storage().data_ptr())
        moved += storage.nbytes()
    return moved


# ---------------------------------------------------------------------- worker side

def _serve(conn: Connection, trainer: ClientTrainer, pipeline: UpdatePipeline, inherited: list[Connection]) -> None:
    """A worker's loop: one task in, one reply out, until told to stop or the parent is gone.

    Reply: (payload bytes or None, metrics, new state bytes or None, error or None, crash)
    where crash is None or (error string, traceback text) when train_client raised.
    """
    import torch

    for c in inherited:
        c.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(1)
    blobs: dict[tuple[int, int], bytes] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is _STOP:
            return
        key, blob, task, state_bytes, shared = message
        if blob is not None and shared:
            blobs = {k: v for k, v in blobs.items() if k[0] == key[0]}  # keep this run's broadcasts only
            blobs[key] = blob
        try:
            state = wire.decode(state_bytes) if state_bytes is not None else None
            params = wire.decode(blob if blob is not None else blobs[key])
            reply = train_client(trainer, replace(task, params=params), pipeline, state)
            out: tuple = (reply.up, dict(reply.metrics), wire.encode(reply.state) if reply.state else None,
                          reply.error, None)
        except Exception as e:
            out = (None, {}, None, None, (f"{type(e).__name__}: {e}", traceback.format_exc()))
        try:
            conn.send(out)
        except (EOFError, OSError):
            return


# ---------------------------------------------------------------------- process bookkeeping

def _death(w: _Worker, cause: Optional[BaseException]) -> str:
    """Stop and reap a dead (or dying) worker and say how it ended."""
    pid = w.process.pid
    _terminate(w)
    code = w.process.exitcode
    _release(w)
    if code is None:  # not reaped even by SIGKILL (uninterruptible sleep)
        how = f"lost its pipe ({type(cause).__name__}: {cause})" if cause else "stopped answering"
    elif code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit code {code}"
    return f"worker died: pid {pid} {how}"


def _terminate(w: _Worker, grace: float = 0.5) -> None:
    """Make sure the worker is gone and reaped (after ``grace`` seconds SIGTERM, then SIGKILL),
    and close its pipe."""
    p = w.process
    p.join(timeout=grace if p.is_alive() else _JOIN_TIMEOUT_S)
    if p.is_alive():
        p.terminate()
        p.join(timeout=_JOIN_TIMEOUT_S)
    if p.is_alive():
        p.kill()
        p.join(timeout=_JOIN_TIMEOUT_S)
    w.conn.close()


def _release(w: _Worker) -> None:
    """Free the process object's resources (its sentinel) once the process is reaped."""
    try:
        w.process.close()
    except ValueError:  # not reaped: leave it to multiprocessing's own bookkeeping
        pass


def _shutdown(slots: list[Optional[_Worker]], owner: int) -> None:
    """Finalizer of a MultiProcessRuntime: ask every worker to stop, then reap it, terminating
    any that does not stop. Only the process that forked the workers does this."""
    if os.getpid() != owner:
        return
    live = [w for w in slots if w is not None]
    for w in live:
        try:
            w.conn.send(_STOP)
        except (OSError, ValueError):
            pass
    for w in live:
        if w.task is None:
            w.process.join(timeout=_JOIN_TIMEOUT_S)
        _terminate(w)
        _release(w)
    slots[:] = [None] * len(slots)
