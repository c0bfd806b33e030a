"""Secure aggregation: the server learns the sum of the clients' updates and nothing else.

Implements SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning") and its sparse-graph variant SecAgg+ (Bell et al. 2020, "Secure Single-
Server Aggregation with (Poly)Logarithmic Overhead") as pure, in-process building blocks for
simulation. Honest-but-curious server; share bundles travel unencrypted (see ``messages``).

Quick use (whole protocol in one call)::

    total = secure_sum(vectors, dropped={3}, bits=32, clip_range=1.0, max_dropout=0.3, seed=0)

Step by step (what a runtime wires between real clients and the server)::

    session = Session.create(n, SecAggConfig(neighbours=None), seed)      # public plan
    clients = [SecAggClient.setup(i, session) for i in range(n)]           # round 0: keys
    server = SecAggServer(session, {c.client_id: c.public_key for c in clients})
    inboxes = server.route_shares({c.client_id: c.share_secrets() for c in clients})  # round 1
    vec, layout = flatten(update.delta)                                     # per client
    masked[i] = clients[i].mask(vec, server.keys_for(i), generator=g, weight=w)      # round 2
    request = server.request_unmasking(masked)                              # round 3
    responses = {i: clients[i].respond(request, inboxes[i]) for i in request.survivors}
    result = server.unmask(masked, responses)                               # round 4
    mean = unflatten(result.mean(), layout)

Weights: ``mask(..., weight=w)`` encodes ``w * vector`` and sends ``w`` in the clear, so
``result.total / result.weight_sum`` is the weighted mean. ``w * vector`` must lie within
``clip_range`` (scale weights to [0, 1], e.g. examples / a public maximum). To hide weights
too, append ``w`` as a coordinate of the vector and pass ``weight=1``.

Modules: ``quantize`` (fixed-point ring encoding), ``prg`` (ChaCha20 mask expansion),
``keys`` (X25519 + HKDF), ``shamir`` (secret sharing), ``graph`` (SecAgg+ Harary graph),
``session`` (config, threshold), ``messages`` (round payloads), ``protocol`` (client, server),
``flat`` (NamedTensors <-> vector).
"""

from __future__ import annotations

from fedfm.secagg.flat import Layout, flatten, unflatten
from fedfm.secagg.messages import AggregateResult, MaskedInput, ShareBundle, UnmaskRequest, UnmaskResponse
from fedfm.secagg.prg import SeededBytes
from fedfm.secagg.protocol import SecAggClient, SecAggServer, secure_sum
from fedfm.secagg.quantize import FixedPoint
from fedfm.secagg.session import SecAggConfig, SecAggError, Session, threshold

__all__ = [
    "AggregateResult",
    "FixedPoint",
    "Layout",
    "MaskedInput",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "SeededBytes",
    "Session",
    "ShareBundle",
    "UnmaskRequest",
    "UnmaskResponse",
    "flatten",
    "secure_sum",
    "threshold",
    "unflatten",
]
