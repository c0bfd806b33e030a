"""Per-client pipeline state (error-feedback residuals) for very many simulated clients.

A ``ClientStateStore`` is a ``MutableMapping[int, dict[str, torch.Tensor]]``, a drop-in for the
plain dict a runtime keeps its ``client_states`` in, that holds states in memory up to a byte
budget and spills the least recently used ones to disk, one safetensors file per client, loading
them back transparently when they are read. With 10,000 clients each keeping a LoRA-sized
residual, the dict would hold gigabytes; the store holds the budget.

Guarantees:
    - Reads return exactly what was stored, bit for bit, for every dtype safetensors holds
      (float32, float64, bfloat16, float16, int8, int64, bool, ...), with the tensor names in the
      order they were stored, whether the state was in memory or on disk.
    - After every write, ``memory_bytes <= memory_budget``. The one exception is by design: a
      state larger than the whole budget never enters memory; it is written to disk directly and
      read from disk on every access.
    - Eviction is least recently used first; a read (``store[c]``, ``store.get(c)``) or a write
      makes a state the most recently used. Iterating ``items()``/``values()`` (what checkpointing
      does) and ``to_dict()`` read spilled states without bringing them back into memory, so a
      full pass over the store neither reorders nor thrashes it.
    - Iteration order is insertion order, exactly as a dict's (re-assigning a key keeps its
      place), independent of where each state lives.
    - Deleting a client (``del``, ``pop``, ``popitem``, ``clear``) deletes its file; ``close()``
      (or garbage collection) deletes every file the store wrote, and the directory when the store
      created it as a temporary one.

Stored tensors are compact: detached, on the CPU, contiguous, each owning exactly its own bytes
(a view into a larger tensor is copied so the larger one can be freed; aliases between names are
copied apart, as safetensors requires). A tensor that already is compact is stored as is, like a
dict stores a reference. Treat a state read from the store as read-only and store a new dict to
change it (runtimes replace a client's state after each turn): the byte accounting is made when
a state is stored.

The store is not thread-safe, and its directory must be private to it: spill files are a cache
(checkpoints are written by fedfm.checkpoint), so files left there by a crashed process are not
read back, only overwritten.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import ItemsView, MutableMapping, ValuesView
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

if TYPE_CHECKING:
    import torch

_ORDER_KEY = "order"  # safetensors metadata field keeping the state's name order


# Hand-written: cachetools' LRU caches drop what they evict and diskcache keeps everything on disk
# (pickled); neither keeps tensors in RAM up to a byte budget and spills the rest as safetensors.
class ClientStateStore(MutableMapping[int, "dict[str, torch.Tensor]"]):
    """Client id -> pipeline state, in memory up to ``memory_budget`` bytes, the rest on disk.

    Args:
        directory: where spilled states go (one ``client-<id>.safetensors`` per client), created
            on the first spill. None: a temporary directory, created on the first spill and removed
            by ``close()``.
        memory_budget: bytes of tensor data kept in memory; None keeps everything in memory (the
            store then behaves as a dict and never touches the disk); 0 keeps no tensor data in
            memory. It may be changed later; the next write enforces the new value.
    """

    def __init__(self, directory: Union[str, os.PathLike, None] = None,
                 memory_budget: Optional[int] = None) -> None:
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes or None, got {memory_budget}")
        self.memory_budget = memory_budget
        self._given_dir = Path(directory) if directory is not None else None
        self._dir: list[Optional[Path]] = [self._given_dir]  # a cell the finalizer shares
        self._index: dict[int, None] = {}  # every client, in insertion order (dict iteration order)
        self._mem: "OrderedDict[int, dict[str, torch.Tensor]]" = OrderedDict()  # LRU first
        self._mem_nbytes: dict[int, int] = {}
        self._disk: dict[int, int] = {}  # client -> file size in bytes
        self._memory_bytes = 0
        self._finalizer = self._new_finalizer()

    def _new_finalizer(self) -> weakref.finalize:
        return weakref.finalize(self, _remove_files, self._dir, self._disk, self._given_dir is None, os.getpid())

    # ------------------------------------------------------------------ reporting

    @property
    def memory_bytes(self) -> int:
        """Bytes of tensor data held in memory."""
        return self._memory_bytes

    @property
    def disk_bytes(self) -> int:
        """Bytes of the spill files on disk (tensor data plus safetensors headers)."""
        return sum(self._disk.values())

    @property
    def num_in_memory(self) -> int:
        return len(self._mem)

    @property
    def num_on_disk(self) -> int:
        return len(self._disk)

    @property
    def directory(self) -> Optional[Path]:
        """The spill directory (None for a temporary one not created yet)."""
        return self._dir[0]

    def __repr__(self) -> str:
        return (f"ClientStateStore({len(self)} clients: {self.num_in_memory} in memory "
                f"({self.memory_bytes} B of {self.memory_budget if self.memory_budget is not None else 'unlimited'}),"
                f" {self.num_on_disk} on disk ({self.disk_bytes} B) in {self.directory})")

    # ------------------------------------------------------------------ mapping protocol

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[int]:
        return iter(self._index)

    def __contains__(self, key: object) -> bool:
        try:
            return _client(key) in self._index
        except TypeError:
            return False

    def __getitem__(self, key: int) -> "dict[str, torch.Tensor]":
        """The client's state, brought into memory (most recently used) unless it alone exceeds
        the budget."""
        c = _client_key(key)
        if c in self._mem:
            self._mem.move_to_end(c)
            return self._mem[c]
        state = self._load(c)
        nbytes = _nbytes(state)
        if self.memory_budget is None or nbytes <= self.memory_budget:
            self._drop_file(c)
            self._keep(c, state, nbytes)
        return state

    def __setitem__(self, key: int, state: "dict[str, torch.Tensor]") -> None:
        c = _client(key)
        compact = _compact(state)
        nbytes = _nbytes(compact)
        self._forget(c)
        self._index.setdefault(c, None)
        if self.memory_budget is not None and nbytes > self.memory_budget:
            self._write(c, compact)  # larger than the whole budget: straight to disk
        else:
            self._keep(c, compact, nbytes)

    def __delitem__(self, key: int) -> None:
        c = _client_key(key)
        self._forget(c)
        del self._index[c]

    def pop(self, key: int, *default: Any) -> Any:  # type: ignore[override]
        """Remove the client and return its state (read without caching it), or ``default``."""
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        c = _client(key)
        state = self._peek(c)
        del self[c]
        return state

    def popitem(self) -> "tuple[int, dict[str, torch.Tensor]]":
        """Remove and return the most recently inserted client, as ``dict.popitem`` does."""
        if not self._index:
            raise KeyError("popitem(): ClientStateStore is empty")
        c = next(reversed(self._index))
        return c, self.pop(c)

    def clear(self) -> None:
        """Remove every client and its file (without reading spilled states back)."""
        for c in list(self._disk):
            self._drop_file(c)
        self._mem.clear()
        self._mem_nbytes.clear()
        self._memory_bytes = 0
        self._index.clear()

    def items(self) -> "ItemsView[int, dict[str, torch.Tensor]]":
        """(client, state) in insertion order; spilled states are read without being cached."""
        return _PeekItems(self)

    def values(self) -> "ValuesView[dict[str, torch.Tensor]]":
        """States in insertion order; spilled states are read without being cached."""
        return _PeekValues(self)

    def to_dict(self) -> "dict[int, dict[str, torch.Tensor]]":
        """Every client's state as a plain dict (spilled states read from disk, not cached)."""
        return {c: self._peek(c) for c in self._index}

    def close(self) -> None:
        """Delete every spill file (and the temporary directory, if the store made it) and empty
        the store, which stays usable. Garbage collection does the same for a store that was not
        closed."""
        self.clear()
        self._finalizer()
        self._finalizer = self._new_finalizer()

    def __enter__(self) -> "ClientStateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _peek(self, c: int) -> "dict[str, torch.Tensor]":
        """The state without changing the LRU order or caching it."""
        if c in self._mem:
            return self._mem[c]
        return self._load(c)

    def _keep(self, c: int, state: "dict[str, torch.Tensor]", nbytes: int) -> None:
        """Hold ``state`` in memory as the most recently used, spilling the least recently used
        others until the budget holds (``state`` itself fits: the caller checked)."""
        self._mem[c] = state
        self._mem_nbytes[c] = nbytes
        self._memory_bytes += nbytes
        if self.memory_budget is None:
            return
        while self._memory_bytes > self.memory_budget:
            oldest = next(iter(self._mem))
            self._write(oldest, self._mem[oldest])  # written first: a failed write loses nothing
            self._memory_bytes -= self._mem_nbytes.pop(oldest)
            del self._mem[oldest]

    def _forget(self, c: int) -> None:
        """Drop the client's state from memory and disk (its index entry stays)."""
        if c in self._mem:
            del self._mem[c]
            self._memory_bytes -= self._mem_nbytes.pop(c)
        else:
            self._drop_file(c)

    def _path(self, c: int) -> Path:
        d = self._dir[0]
        if d is None:
            d = self._dir[0] = Path(tempfile.mkdtemp(prefix="fedfm-client-states-"))
        return d / f"client-{c}.safetensors"

    def _write(self, c: int, state: "dict[str, torch.Tensor]") -> None:
        from safetensors.torch import save_file

        path = self._path(c)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={_ORDER_KEY: json.dumps(list(state))})
        self._disk[c] = path.stat().st_size

    def _load(self, c: int) -> "dict[str, torch.Tensor]":
        from safetensors import safe_open

        if c not in self._disk:
            raise KeyError(c)
        # "pread" reads into memory the tensors own; the default mmap backend would leave them
        # backed by the file, which the store deletes or overwrites.
        with safe_open(str(self._path(c)), framework="pt", backend="pread") as f:
            order = json.loads((f.metadata() or {}).get(_ORDER_KEY, "[]")) or list(f.keys())
            return {k: f.get_tensor(k) for k in order}

    def _drop_file(self, c: int) -> None:
        if self._disk.pop(c, None) is not None:
            try:
                self._path(c).unlink()
            except FileNotFoundError:
                pass


class _PeekItems(ItemsView):
    _mapping: ClientStateStore

    def __iter__(self) -> Iterator["tuple[int, dict[str, torch.Tensor]]"]:
        for c in self._mapping._index:
            yield c, self._mapping._peek(c)


class _PeekValues(ValuesView):
    _mapping: ClientStateStore

    def __iter__(self) -> Iterator["dict[str, torch.Tensor]"]:
        for c in self._mapping._index:
            yield self._mapping._peek(c)


def _client(key: object) -> int:
    """A client id as a plain int (numpy integers welcome); TypeError for anything else."""
    return int(operator.index(key))  # type: ignore[arg-type]


def _client_key(key: object) -> int:
    """``_client`` for lookups: a key that cannot be a client id is simply missing."""
    try:
        return _client(key)
    except TypeError:
        raise KeyError(key) from None


def _nbytes(state: "dict[str, torch.Tensor]") -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _compact(state: "dict[str, torch.Tensor]") -> "dict[str, torch.Tensor]":
    """Detached, CPU, contiguous tensors that each own exactly their bytes and alias no other
    name (safetensors refuses aliases); tensors that already are so are kept, not copied."""
    import torch

    if not isinstance(state, dict) and not hasattr(state, "items"):
        raise TypeError(f"a client state is a mapping name -> tensor, got {type(state).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        if not isinstance(name, str):
            raise TypeError(f"state names are strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state value {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.is_sparse or t.layout != torch.strided:
            t = t.to_dense()
        t = t.detach().to("cpu")
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        owns_exactly = (t.is_contiguous() and t.storage_offset() == 0
                        and storage.nbytes() == t.numel() * t.element_size())
        if not owns_exactly or (t.numel() and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def _remove_files(cell: "list[Optional[Path]]", disk: dict[int, int], owned: bool, pid: int) -> None:
    """Finalizer: delete the spill files (and the directory, if temporary). Runs in the process
    that made the store only (a forked child shares the files but does not own them)."""
    if os.getpid() != pid:
        return
    d = cell[0]
    if d is None:
        return
    for c in list(disk):
        try:
            (d / f"client-{c}.safetensors").unlink()
        except FileNotFoundError:
            pass
    disk.clear()
    if owned:
        shutil.rmtree(d, ignore_errors=True)
        cell[0] = None
