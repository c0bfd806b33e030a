"""Downlink compression: a client receives a compressed correction of the model it already holds.

Uplink codecs shrink what a client sends; the download (the global trainable state) is then the
larger part of a round's bytes: with LoRA and 4-bit uplinks it was six times the upload. The
global state is dense and changes every round, so it cannot be sparsified as is; what is small is
its distance from what the client holds. So the server keeps, per client, a *replica* of what
that client holds, and sends

    payload = encode(global - replica);   replica <- replica + decode(payload)

and the client trains from its new replica (its update is measured from there, and the server
adds the updates to the exact global state). This is error feedback on the downlink, one memory
per client (as in Tang et al. 2019, DoubleSqueeze, and Philippenko & Dieuleveut 2021, with
partial participation): what a message leaves out stays in ``global - replica`` and is sent the
next time that client is sampled, however many rounds later, so a client's replica is never
further from the global state than one message's error (for ``quantize``, one step of its grid
per value), and a client that sat out many rounds costs the same bytes as any other.

Bytes are the encoded payload (exactly, as ``wire.encode`` writes it). Every client starts from
the initial trainable state (round 0), which it builds itself from the experiment's config and
seed, as it builds the frozen base weights; full fine-tuning's byte counts make the same
assumption about the pretrained weights. The server keeps replicas in a
:class:`~fedfm.runtime.store.ClientStateStore` (in RAM up to ``runtime.client_state_mb``, the
rest on disk; a budget of its own, beside the client states') and checkpoints them, so a
resumed run equals an uninterrupted one. Memory: one trainable state per client that has taken
part (LoRA on MiniLM: 1.4 MB; full fine-tuning: the whole model), so set the budget for full
fine-tuning of many clients.

Written here because no library does it: codecs (fedfm.compression) are reused as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, MutableMapping

from fedfm import wire
from fedfm.compression.base import Compressor

if TYPE_CHECKING:
    import torch

    from fedfm.types import NamedTensors

INITIAL = -1
"""Key of the initial state (what every client starts from) in the replica store."""

DOWN_BYTES = "down_bytes"
"""ClientTask.payload key: the bytes of the compressed download (they replace the broadcast's)."""


@dataclass
class Downlink:
    """Args:
        codec: any codec or chain (stateless; the replica is the error feedback).
        replicas: client id -> the trainable values that client holds; ``INITIAL`` -> the
            initial state. A dict, or a ClientStateStore for many clients.
    """

    codec: Compressor
    replicas: "MutableMapping[int, dict[str, torch.Tensor]]" = field(default_factory=dict)

    def start(self, params: "NamedTensors") -> None:
        """Record the initial state every client holds before its first download."""
        self.replicas[INITIAL] = {k: v.detach().clone() for k, v in params.items()}

    def nbytes(self, params: "NamedTensors") -> int:
        """Bytes of one client's download of ``params``: the payload's layout depends only on the
        names, shapes and dtypes, so this needs no encoding."""
        return wire.encoded_size(self.codec.payload_like(params))

    def send(self, client: int, params: "NamedTensors", generator: "torch.Generator"
             ) -> "tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]":
        """(the payload sent to ``client``, the client's new replica) for the global ``params``;
        the replica is stored.

        Raises:
            RuntimeError: if ``start`` was never called (no initial state to correct from).
        """
        held = self.replicas.get(client)
        if held is None:
            held = self.replicas.get(INITIAL)
            if held is None:
                raise RuntimeError("downlink compression has no initial state; call Downlink.start(params) first")
        if list(held) != list(params):
            raise RuntimeError(f"client {client}'s replica names differ from the global state's "
                               f"({len(held)} against {len(params)} tensors)")
        diff = {k: (v - held[k]) if v.is_floating_point() else v for k, v in params.items()}
        payload, _ = self.codec.encode(diff, None, generator)
        got = self.codec.decode(payload, diff)
        # what the client adds; a tensor the codec passed through whole (quantize's small ones, and
        # non-float ones, sent as they are) makes the replica exactly the global value
        new = {k: v.clone() if got[k] is diff[k] else held[k] + got[k].to(v.dtype) for k, v in params.items()}
        self.replicas[client] = new
        return payload, new
