"""ClientStateStore: a dict of client states that spills the least recently used to disk."""

from __future__ import annotations

import os
import random

import pytest
import torch

from fedfm.checkpoint import load_client_states, load_state, save_state
from fedfm.runtime.store import ClientStateStore
from fedfm.types import ServerState

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.int64, torch.bool]


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3
        t = t.to(dtype)
        flat = t.view(-1)
        if flat.numel() >= 4:  # the values a residual can hold at the edges of the format
            flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, torch.finfo(dtype).tiny], dtype=dtype)
        return t
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=gen, dtype=dtype)


def _bits(t: torch.Tensor) -> bytes:
    """The raw bytes: NaN == NaN and -0.0 != 0.0, unlike torch.equal."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and _bits(a[k]) == _bits(b[k]) for k in a)


def _state(gen: torch.Generator, n: int = 16) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(n, generator=gen), "step": torch.tensor([n], dtype=torch.int64)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_round_trip_through_disk(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    state = {"z": _random(dtype, (3, 5), gen), "a": _random(dtype, (7,), gen), "scalar": _random(dtype, (), gen),
             "empty": _random(dtype, (0, 4), gen)}
    store = ClientStateStore(tmp_path, memory_budget=0)  # nothing stays in memory
    store[5] = state
    assert store.num_on_disk == 1 and store.num_in_memory == 0 and store.memory_bytes == 0
    assert (tmp_path / "client-5.safetensors").is_file()
    back = store[5]
    assert _same(back, state)  # values, dtypes, shapes and the name order
    assert _same(store.to_dict()[5], state)
    back["a"].view(-1)[0] = 0  # the loaded tensors own their memory: the file is untouched
    assert _same(store[5], state)


def test_mixed_dtypes_and_views_round_trip_compactly(tmp_path):
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(100, 100, generator=gen, requires_grad=True)
    state = {f"t{i}": _random(d, (4, 3), gen) for i, d in enumerate(DTYPES)}
    state["view"] = big[10:12, ::3]  # a strided view into a 40 KB tensor with autograd history
    state["alias"] = state["t0"]  # two names, one storage
    store = ClientStateStore(tmp_path, memory_budget=10**6)
    store[0] = state
    kept = store[0]
    assert not kept["view"].requires_grad and kept["view"].is_contiguous()
    assert kept["view"].untyped_storage().nbytes() == 2 * 34 * 4  # its own bytes, not the 40 KB
    assert kept["alias"].data_ptr() != kept["t0"].data_ptr()
    assert store.memory_bytes == sum(t.numel() * t.element_size() for t in state.values())
    store.memory_budget = 0
    store[1] = {}  # the next write evicts client 0 to disk
    assert store.num_on_disk == 1 and 0 in store._disk
    expect = {k: v.detach() for k, v in state.items()}
    assert _same(store[0], expect)


def test_budget_respected_after_every_set(tmp_path):
    gen = torch.Generator().manual_seed(2)
    budget = 1000
    store = ClientStateStore(tmp_path, memory_budget=budget)
    for c in range(50):
        n = int(torch.randint(1, 200, (1,), generator=gen))  # 4..800 bytes of float32
        store[c] = {"w": torch.randn(n, generator=gen)}
        assert store.memory_bytes <= budget
        if c % 3 == 0:
            _ = store[c // 2]  # reads bring states back, and still respect the budget
            assert store.memory_bytes <= budget
    assert store.num_in_memory + store.num_on_disk == len(store) == 50
    assert store.disk_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_state_larger_than_budget_goes_to_disk_directly(tmp_path):
    store = ClientStateStore(tmp_path, memory_budget=100)
    small = {"w": torch.ones(10)}  # 40 bytes
    store[1] = small
    store[2] = {"w": torch.arange(1000.0)}  # 4000 bytes: larger than the whole budget
    assert store.num_in_memory == 1 and store.num_on_disk == 1 and store.memory_bytes == 40
    assert torch.equal(store[2]["w"], torch.arange(1000.0))
    assert store.num_in_memory == 1 and store.num_on_disk == 1  # read from disk, not cached
    assert 1 in store._mem  # the small state was not evicted for it


def test_lru_order_of_spilling(tmp_path):
    store = ClientStateStore(tmp_path, memory_budget=3 * 40)  # room for three 40-byte states
    for c in (1, 2, 3):
        store[c] = {"w": torch.full((10,), float(c))}
    _ = store[1]  # 1 is now the most recently used: order 2, 3, 1
    store[4] = {"w": torch.full((10,), 4.0)}  # evicts 2
    assert set(store._mem) == {3, 1, 4} and set(store._disk) == {2}
    store.get(3)  # order 1, 4, 3
    store[2] = store[2]  # reading 2 back evicts 1; writing it makes it most recent: 4, 3, 2
    assert set(store._mem) == {4, 3, 2} and set(store._disk) == {1}
    store[5] = {"w": torch.full((10,), 5.0)}  # evicts 4
    store[6] = {"w": torch.full((10,), 6.0)}  # evicts 3
    assert list(store._mem) == [2, 5, 6] and set(store._disk) == {1, 3, 4}
    assert [float(store[c]["w"][0]) for c in range(1, 7)] == [1, 2, 3, 4, 5, 6]
    assert list(store) == [1, 2, 3, 4, 5, 6]  # iteration is insertion order, wherever states live


def test_iterating_does_not_reorder_or_cache(tmp_path):
    store = ClientStateStore(tmp_path, memory_budget=2 * 40)
    for c in range(5):
        store[c] = {"w": torch.full((10,), float(c))}
    mem, disk = list(store._mem), set(store._disk)
    assert [float(s["w"][0]) for s in store.values()] == [0, 1, 2, 3, 4]
    assert [c for c, _ in store.items()] == [0, 1, 2, 3, 4]
    assert set(store.to_dict()) == {0, 1, 2, 3, 4}
    assert list(store._mem) == mem and set(store._disk) == disk
    assert 0 in store and 99 not in store and "x" not in store


def test_pop_and_del_remove_files(tmp_path):
    store = ClientStateStore(tmp_path, memory_budget=0)
    for c in range(4):
        store[c] = {"w": torch.full((3,), float(c))}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client-{c}.safetensors" for c in range(4)]
    assert float(store.pop(1)["w"][0]) == 1.0
    del store[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-0.safetensors", "client-3.safetensors"]
    assert store.pop(2, None) is None
    with pytest.raises(KeyError):
        del store[2]
    with pytest.raises(KeyError):
        store.pop(2)
    c, s = store.popitem()  # the most recently inserted, like dict.popitem
    assert c == 3 and float(s["w"][0]) == 3.0
    store[7] = {"w": torch.ones(3)}
    store.clear()
    assert len(store) == 0 and store.disk_bytes == 0 and not list(tmp_path.iterdir())
    # overwriting a spilled client with one that fits in memory removes its file
    roomy = ClientStateStore(tmp_path, memory_budget=0)
    roomy[0] = {"w": torch.ones(2)}
    roomy[0] = {}
    assert roomy.num_in_memory == 1 and not list(tmp_path.iterdir())


def test_close_and_gc_remove_the_temporary_directory():
    import gc

    store = ClientStateStore(memory_budget=0)
    assert store.directory is None  # created lazily
    store[0] = {"w": torch.ones(3)}
    d = store.directory
    assert d is not None and d.is_dir()
    store.close()
    assert not d.exists() and len(store) == 0
    store[1] = {"w": torch.ones(3)}  # usable after close, in a new temporary directory
    d2 = store.directory
    assert d2.is_dir()
    del store
    gc.collect()
    assert not d2.exists()


@pytest.fixture
def fast_dir(tmp_path):
    """A RAM-backed directory where the machine has one (creating 10,000 files on this VM's disk
    takes ~3 ms each); the store behaves the same on any file system."""
    import shutil
    import tempfile
    from pathlib import Path

    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="fedfm-test-store-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_ten_thousand_clients_small_budget(fast_dir):
    gen = torch.Generator().manual_seed(3)
    per = 16 * 4 + 8  # bytes of one state from _state
    budget = 200 * per
    spill = fast_dir / "spill"
    store = ClientStateStore(spill, memory_budget=budget)
    ref = {}
    for c in range(10_000):
        ref[c] = _state(gen)
        store[c] = ref[c]
    assert len(store) == 10_000
    assert store.num_in_memory == 200 and store.num_on_disk == 9_800
    assert store.memory_bytes == 200 * per <= budget
    assert store.disk_bytes > 9_800 * per
    for c in random.Random(0).sample(range(10_000), 300):
        assert _same(store[c], ref[c])
        assert store.memory_bytes <= budget
    assert store.num_in_memory + store.num_on_disk == 10_000
    store.close()
    assert not list(spill.iterdir())


def test_behaves_like_a_dict_under_random_operations(tmp_path):
    """Property-style: a seeded random sequence of mapping operations on the store and on a
    reference dict gives the same answers and the same contents, with the budget held throughout."""
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(1234)
    budget = 5 * 64
    store, ref = ClientStateStore(tmp_path, memory_budget=budget), {}
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float64, torch.int8]

    def new_state():
        return {f"p{j}": _random(rng.choice(dtypes), (rng.randint(0, 40),), gen) for j in range(rng.randint(0, 3))}

    for _ in range(2000):
        op = rng.choice(["set", "set", "get", "get", "del", "pop", "popdefault", "contains", "len", "popitem",
                         "setdefault", "update", "iter"])
        c = rng.randrange(30)
        if op == "set":
            s = new_state()
            store[c], ref[c] = s, s
        elif op == "get":
            if c in ref:
                assert _same(store[c], ref[c])
            else:
                with pytest.raises(KeyError):
                    store[c]
            assert (store.get(c) is None) == (ref.get(c) is None)
        elif op == "del":
            if c in ref:
                del store[c], ref[c]
            else:
                with pytest.raises(KeyError):
                    del store[c]
        elif op == "pop":
            if c in ref:
                assert _same(store.pop(c), ref.pop(c))
            else:
                with pytest.raises(KeyError):
                    store.pop(c)
        elif op == "popdefault":
            a, b = store.pop(c, "missing"), ref.pop(c, "missing")
            assert a == b == "missing" if isinstance(b, str) else _same(a, b)
        elif op == "contains":
            assert (c in store) == (c in ref)
        elif op == "len":
            assert len(store) == len(ref)
        elif op == "popitem":
            if ref:
                (ka, va), (kb, vb) = store.popitem(), ref.popitem()
                assert ka == kb and _same(va, vb)
            else:
                with pytest.raises(KeyError):
                    store.popitem()
        elif op == "setdefault":
            s = new_state()
            assert _same(store.setdefault(c, s), ref.setdefault(c, s))
        elif op == "update":
            batch = {rng.randrange(30): new_state() for _ in range(rng.randint(1, 4))}
            store.update(batch)
            ref.update(batch)
        elif op == "iter":
            assert list(store) == list(ref)
            assert all(_same(a, b) for a, b in zip(store.values(), ref.values()))
        assert store.memory_bytes <= budget
        assert store.num_in_memory + store.num_on_disk == len(store) == len(ref)
        assert {p.name for p in tmp_path.iterdir()} == {f"client-{k}.safetensors" for k in store._disk}
    assert list(store) == list(ref) and all(_same(store[k], ref[k]) for k in ref)
    assert store.num_on_disk > 0  # the sequence did exercise the disk


def test_checkpoint_code_saves_and_restores_a_store_unchanged(tmp_path):
    """fedfm.checkpoint writes ``client_states`` through ``if client_states`` and ``.items()``;
    the runner restores it with ``client_states.update(load_client_states(...))``."""
    gen = torch.Generator().manual_seed(5)
    store = ClientStateStore(tmp_path / "spill", memory_budget=3 * 72)
    ref = {c: _state(gen) for c in range(10)}
    store.update(ref)
    assert store.num_on_disk == 7
    state = ServerState(round=3, params={"w": torch.zeros(2)})
    save_state(tmp_path / "ckpt", state, {"elapsed_s": 1.0}, store)
    _, meta = load_state(tmp_path / "ckpt")
    restored = ClientStateStore(tmp_path / "spill2", memory_budget=3 * 72)
    restored.update(load_client_states(tmp_path / "ckpt", meta))
    assert list(restored) == list(ref) and all(_same(restored[c], ref[c]) for c in ref)
    empty = ClientStateStore(tmp_path / "spill3", memory_budget=0)
    save_state(tmp_path / "ckpt2", state, {}, empty)  # an empty store writes no clients file
    assert "clients" not in load_state(tmp_path / "ckpt2")[1]
