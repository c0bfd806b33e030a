"""Compressor extension point: codecs that shrink a client's update for the uplink.

A codec maps NamedTensors to NamedTensors: ``encode`` turns a dense delta into a *wire payload*
of compact tensors (packed codes, indices, factors) and ``decode`` undoes it on the server, given
``like`` (the names, shapes and dtypes of the original). Because input and output are the same
kind of thing, codecs compose: :class:`Chain` applies them in order on the payload and decodes in
reverse. Payload names are ``"<name>.<part>"`` (e.g. ``"w.idx"``, ``"w.val.q"``); a tensor a codec
leaves alone keeps its name.

Every codec also answers ``payload_like(like)``: the names, shapes and dtypes (as meta tensors)
of the payload it would produce. It depends only on ``like``, so the server can check an incoming
payload before decoding it, and a chain can decode without anything beyond ``like``.

Codecs are stateless; error feedback (Stich et al. 2018; Karimireddy et al. 2019) is a wrapper,
:class:`ErrorFeedback`, around any codec or chain, and its residual is the per-client state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from fedfm import wire
from fedfm.registry import Registry
from fedfm.types import NamedTensors


class Compressor(Protocol):
    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Return the wire payload of ``delta`` and the new per-client state (None if stateless)."""
        ...

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        """Return the dense delta with the names, shapes and dtypes of ``like``."""
        ...

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        """Meta tensors with the names, shapes and dtypes ``encode`` produces for a delta like ``like``."""
        ...


class CompressionSettings(Protocol):
    """What ``from_config`` reads; the experiment config's compression section fits it."""

    bits: int
    fraction: float
    rank: int


@dataclass(frozen=True)
class CompressionOptions:
    """A plain :class:`CompressionSettings` (defaults as in :func:`build_compressor`)."""

    bits: int = 8
    fraction: float = 0.01
    rank: int = 4


COMPRESSORS: Registry[Any] = Registry("compressor")


def build_compressor(
    names: str | Sequence[str],
    bits: int = 8,
    fraction: float = 0.01,
    rank: int = 4,
    error_feedback: bool = False,
) -> Compressor:
    """The codec (or chain of codecs, applied in the given order) named by ``names``.

    ``"none"`` entries are dropped; an empty chain is the identity. With ``error_feedback`` the
    whole chain is wrapped in :class:`ErrorFeedback`. Only the parameters of the named codecs are
    validated.

    Raises:
        ConfigError: for an unknown name.
        ValueError: for a bad bits / fraction / rank, or ``quantize`` before another codec.
    """
    chain = [n for n in ([names] if isinstance(names, str) else list(names)) if n != "none"]
    if "quantize" in chain[:-1]:
        raise ValueError(
            f"quantize must be the last codec of a chain (packed codes do not compress further); got {chain}"
        )
    settings = CompressionOptions(bits=bits, fraction=fraction, rank=rank)
    codecs = tuple(COMPRESSORS.get(n).from_config(settings) for n in chain)
    if not codecs:
        return Identity()
    codec: Compressor = codecs[0] if len(codecs) == 1 else Chain(codecs)
    return ErrorFeedback(codec) if error_feedback else codec


def payload_bytes(payload: NamedTensors) -> int:
    """Exact uplink size: the length of the payload's wire serialization."""
    return len(wire.encode(payload))


def check_payload(compressor: Compressor, payload: NamedTensors, like: NamedTensors) -> str | None:
    """Why ``payload`` cannot be decoded against ``like`` (names, shapes, dtypes), or None if it can."""
    expected = _expected_layout(compressor, like)
    if list(payload) != list(expected):
        missing, extra = sorted(set(expected) - set(payload))[:3], sorted(set(payload) - set(expected))[:3]
        return f"payload names differ (missing {missing}, unexpected {extra})"
    for k, v in payload.items():
        shape, dtype = expected[k]
        if tuple(v.shape) != shape or v.dtype != dtype:
            return f"payload {k} is {tuple(v.shape)} {v.dtype}, expected {shape} {dtype}"
    return None


_LAYOUTS: dict = {}
"""(compressor, layout of ``like``) -> the payload's expected {name: (shape, dtype)}: a round
checks every client's payload against the same few layouts, and building the meta tensors of
``payload_like`` for each one cost more than the check itself (0.1-0.2 ms a client)."""


def _expected_layout(compressor: Compressor, like: NamedTensors) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    key = (compressor, tuple((k, tuple(v.shape), v.dtype) for k, v in like.items()))
    try:
        return _LAYOUTS[key]  # type: ignore[no-any-return]
    except KeyError:
        pass
    except TypeError:  # a codec that cannot be hashed: no memo
        key = None
    layout = {k: (tuple(v.shape), v.dtype) for k, v in compressor.payload_like(like).items()}
    if key is not None:
        if len(_LAYOUTS) >= 512:  # heterogeneous ranks make a few layouts each; never unbounded
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


@COMPRESSORS.register("none")
@dataclass(frozen=True)
class Identity:
    """Sends the delta as it is."""

    @classmethod
    def from_config(cls, cfg: CompressionSettings) -> "Identity":
        return cls()

    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], None]:
        return dict(delta), None

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        return {k: payload[k] for k in like}

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        return {k: meta(v.shape, v.dtype) for k, v in like.items()}


@dataclass(frozen=True)
class Chain:
    """Codecs applied in order on the payload, decoded in reverse.

    The state of stage ``i`` is stored under ``"<i>:<name>"`` so stages never share keys.
    """

    codecs: tuple[Compressor, ...]

    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        payload, new_state = dict(delta), {}
        for i, codec in enumerate(self.codecs):
            payload, s = codec.encode(payload, _stage_state(state, i), generator)
            new_state.update({f"{i}:{k}": v for k, v in (s or {}).items()})
        return payload, new_state or None

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        likes = [like]
        for codec in self.codecs[:-1]:
            likes.append(codec.payload_like(likes[-1]))
        out = dict(payload)
        for codec, stage_like in zip(reversed(self.codecs), reversed(likes)):
            out = codec.decode(out, stage_like)
        return out

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        out = dict(like)
        for codec in self.codecs:
            out = codec.payload_like(out)
        return out


def _stage_state(state: NamedTensors | None, i: int) -> dict[str, torch.Tensor] | None:
    prefix = f"{i}:"
    sub = {k[len(prefix) :]: v for k, v in (state or {}).items() if k.startswith(prefix)}
    return sub or None


@dataclass(frozen=True)
class ErrorFeedback:
    """Error feedback around a stateless codec (EF-SGD, Karimireddy et al. 2019; Stich et al. 2018).

    Each round the client compresses ``delta + residual`` and keeps as its new residual what the
    server will not see: ``(delta + residual) - decode(encode(delta + residual))``. So over rounds
    the sum of everything decoded plus the last residual equals the sum of the deltas. Residuals
    are kept in at least float32 (a bf16 residual would drop exactly the small values it must
    carry); non-float tensors have none.
    """

    inner: Compressor

    def encode(
        self, delta: NamedTensors, state: NamedTensors | None, generator: torch.Generator
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        corrected = {k: _with_residual(v, (state or {}).get(k)) for k, v in delta.items()}
        sendable = {k: corrected[k].to(delta[k].dtype) for k in delta}
        payload, inner_state = self.inner.encode(sendable, None, generator)
        if inner_state is not None:
            raise ValueError("ErrorFeedback needs a stateless inner codec")
        sent = self.inner.decode(payload, delta)
        residual = {k: c - sent[k].to(c.dtype) for k, c in corrected.items() if c.is_floating_point()}
        return payload, residual

    def decode(self, payload: NamedTensors, like: NamedTensors) -> dict[str, torch.Tensor]:
        return self.inner.decode(payload, like)

    def payload_like(self, like: NamedTensors) -> dict[str, torch.Tensor]:
        return self.inner.payload_like(like)


def _with_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    if not x.is_floating_point():
        return x
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return wide if residual is None else wide + residual.to(wide.dtype)


def meta(shape: Sequence[int] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A storage-free tensor standing for a payload entry's shape and dtype."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def put(out: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """Add a payload entry, refusing a name two parameters would both produce."""
    if key in out:
        raise ValueError(f"payload name {key!r} is produced twice; rename the parameter that ends in its suffix")
    out[key] = value
