"""The SecAgg / SecAgg+ protocol (Bonawitz et al. 2017; Bell et al. 2020) between in-process
clients and a server, for simulation.

Client i sends y_i = q_i + PRG(b_i) + sum_{j in N(i)} sign(i, j) PRG(s_ij)  (mod 2^bits), where
q_i is its encoded input, b_i a fresh self-mask seed, s_ij the seed agreed with neighbour j and
sign(i, j) = +1 if i < j else -1. Summed over survivors S, pairwise masks between survivors
cancel. The server then removes PRG(b_i) for i in S (b_i rebuilt from t shares) and, for each
dropped neighbour j, the uncancelled sign(i, j) PRG(s_ij) (s_ij rebuilt from j's mask key,
itself rebuilt from t shares). It never learns both b_i and the mask key of one client.

Dropouts are modelled after the sharing round: a client that drops earlier has not committed
to anything; start a new :class:`~fedfm.secagg.session.Session` without it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Collection, Mapping, Sequence

import torch

from fedfm.secagg import keys, shamir
from fedfm.secagg.messages import (
    AggregateResult,
    MaskedInput,
    ShareBundle,
    UnmaskRequest,
    UnmaskResponse,
    check_disjoint,
)
from fedfm.secagg.prg import SEED_BYTES, RandomBytes, SeededBytes, expand_mask, system_bytes
from fedfm.secagg.quantize import reduce
from fedfm.secagg.session import SecAggConfig, SecAggError, Session


def _pair_mask(seed: bytes, i: int, j: int, length: int, bits: int) -> torch.Tensor:
    """sign(i, j) * PRG(s_ij) mod 2^bits: what client i adds for its pair with j."""
    m = expand_mask(seed, length, bits)
    return m if i < j else reduce(-m, bits)


def _point(holder: int) -> int:
    return holder + 1  # Shamir evaluation points must be non-zero


@dataclass(frozen=True)
class SecAggClient:
    """One client's secrets for one aggregation. Create with :meth:`setup`; never reuse.

    Attributes:
        client_id: index in 0..n-1.
        session: the public plan.
        mask_key: raw X25519 private key (masking key pair).
        self_seed: b_i, the 32-byte self-mask seed.
    """

    client_id: int
    session: Session
    mask_key: bytes = field(repr=False)
    self_seed: bytes = field(repr=False)

    @classmethod
    def setup(cls, client_id: int, session: Session, rng: RandomBytes = system_bytes) -> "SecAggClient":
        """Round 0: draw a fresh key pair and self-mask seed."""
        if not 0 <= client_id < session.num_clients:
            raise ValueError(f"client_id={client_id} not in [0, {session.num_clients})")
        return cls(client_id, session, keys.new_private_key(rng), rng(SEED_BYTES))

    @property
    def public_key(self) -> bytes:
        """Round 0: what the client advertises."""
        return keys.public_key(self.mask_key)

    def share_secrets(self, rng: RandomBytes = system_bytes) -> dict[int, ShareBundle]:
        """Round 1: Shamir-share b_i and the mask key among the holders (self and neighbours).

        Returns:
            holder id -> bundle (to be encrypted for that holder in a deployment).
        """
        holders = self.session.holders(self.client_id)
        xs, t = [_point(h) for h in holders], self.session.threshold
        seeds = shamir.split(int.from_bytes(self.self_seed, "big"), xs, t, rng)
        key_shares = shamir.split(int.from_bytes(self.mask_key, "big"), xs, t, rng)
        return {h: ShareBundle(self.client_id, h, s, k) for h, s, k in zip(holders, seeds, key_shares)}

    def mask(
        self, vector: torch.Tensor, public_keys: Mapping[int, bytes], *, generator: torch.Generator,
        weight: float = 1.0,
    ) -> MaskedInput:
        """Round 2: encode ``weight * vector`` and add the self mask and the pairwise masks.

        Args:
            vector: 1-D float tensor (see :func:`~fedfm.secagg.flat.flatten`).
            public_keys: at least the neighbours' advertised public keys.
            generator: randomness of the stochastic rounding.
            weight: multiplies the vector before clipping; sent in the clear.

        Raises:
            ValueError: on a non-1-D or non-finite vector, a negative or non-finite weight, or a
                missing neighbour key.
        """
        if vector.dim() != 1:
            raise ValueError(f"mask() takes a 1-D vector, got shape {tuple(vector.shape)}; flatten first")
        if not 0 <= weight < float("inf"):
            raise ValueError(f"weight={weight} not allowed: must be finite and >= 0")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"client {self.client_id}'s vector has NaN or infinite values; refusing to encode it")
        bits, n = self.session.codec.bits, vector.numel()
        q = self.session.codec.quantize(vector * weight, generator)
        y = reduce(q + expand_mask(self.self_seed, n, bits), bits)
        neighbours = sorted(self.session.neighbours[self.client_id])
        missing = [j for j in neighbours if j not in public_keys]
        if missing:
            raise ValueError(f"client {self.client_id} has no public key for its neighbours {missing}")
        seeds = keys.agree_all(self.mask_key, {j: public_keys[j] for j in neighbours})
        for j, seed in seeds.items():
            y = reduce(y + _pair_mask(seed, self.client_id, j, n, bits), bits)
        return MaskedInput(self.client_id, y, float(weight))

    def respond(self, request: UnmaskRequest, held: Mapping[int, ShareBundle]) -> UnmaskResponse:
        """Round 3: reveal self-seed shares of survivors and mask-key shares of dropped clients.

        A client must answer at most once per session: two requests with different survivor
        sets could together reveal both secrets of one client (the runtime enforces this).

        Args:
            request: the server's request.
            held: owner -> the bundle this client received from that owner in round 1.

        Raises:
            SecAggError: if the request lists a client as both survived and dropped, or has
                fewer survivors than the threshold (Bonawitz et al. 2017: honest clients abort).
        """
        check_disjoint(request.survivors, request.dropped)  # again: the request may be forged
        t = self.session.threshold
        if len(request.survivors) < t:
            raise SecAggError(f"request lists {len(request.survivors)} survivors, fewer than the threshold t={t}")
        return UnmaskResponse(
            self.client_id,
            {o: b.self_seed for o, b in held.items() if o in request.survivors},
            {o: b.mask_key for o, b in held.items() if o in request.dropped},
        )


@dataclass(frozen=True)
class SecAggServer:
    """The server of one aggregation: relays messages, then unmasks the sum.

    Attributes:
        session: the public plan.
        public_keys: client id -> advertised public key, for all n clients (round 0).
    """

    session: Session
    public_keys: Mapping[int, bytes]

    def __post_init__(self) -> None:
        missing = sorted(set(range(self.session.num_clients)) - set(self.public_keys))
        if missing:
            raise ValueError(f"no public key advertised by clients {missing}")

    def keys_for(self, client_id: int) -> dict[int, bytes]:
        """Round 0 relay: the public keys of ``client_id``'s neighbours."""
        return {j: self.public_keys[j] for j in self.session.neighbours[client_id]}

    def route_shares(self, outboxes: Mapping[int, Mapping[int, ShareBundle]]) -> dict[int, dict[int, ShareBundle]]:
        """Round 1 relay: owner -> holder -> bundle becomes holder -> owner -> bundle."""
        inboxes: dict[int, dict[int, ShareBundle]] = {i: {} for i in range(self.session.num_clients)}
        for owner, box in outboxes.items():
            for holder, bundle in box.items():
                if bundle.owner != owner or bundle.holder != holder:
                    raise SecAggError(f"bundle from {owner} to {holder} is labelled {bundle.owner} -> {bundle.holder}")
                inboxes[holder][owner] = bundle
        return inboxes

    def request_unmasking(self, masked: Mapping[int, MaskedInput]) -> UnmaskRequest:
        """Round 3: survivors are exactly the clients whose masked input arrived.

        Raises:
            SecAggError: if too few clients survived, overall or in some neighbourhood, for t
                holders to answer (naming survivors, threshold and max_dropout).
        """
        n, t = self.session.num_clients, self.session.threshold
        survivors = frozenset(masked)
        if not survivors <= set(range(n)):
            raise SecAggError(f"masked inputs from unknown clients {sorted(survivors - set(range(n)))}")
        dropped = frozenset(range(n)) - survivors
        budget = f"threshold t={t} of {self.session.degree + 1} holders, max_dropout={self.session.config.max_dropout}"
        if len(survivors) < t:
            raise SecAggError(f"only {len(survivors)} of {n} clients survived ({sorted(survivors)}); {budget}")
        for c in sorted(survivors) + sorted(j for j in dropped if self.session.neighbours[j] & survivors):
            alive = len(set(self.session.holders(c)) & survivors)
            if alive < t:
                raise SecAggError(f"only {alive} share holders of client {c} survived; {budget}")
        return UnmaskRequest(survivors, dropped)

    def unmask(self, masked: Mapping[int, MaskedInput], responses: Mapping[int, UnmaskResponse]) -> AggregateResult:
        """Round 4: rebuild the needed secrets, remove all masks, decode the sum.

        Args:
            masked: client id -> masked input, for the clients whose input arrived.
            responses: holder id -> its answer to :meth:`request_unmasking`'s request.

        Raises:
            SecAggError: on too few survivors or shares, a response revealing a secret the
                request did not allow, or inconsistent shares.
        """
        request = self.request_unmasking(masked)
        self._check_responses(request, responses)
        lengths = {m.vector.numel() for m in masked.values()}
        if len(lengths) != 1:
            raise SecAggError(f"masked inputs have different lengths {sorted(lengths)}")
        total = self._sum_and_unmask(masked, responses, request, lengths.pop())
        survivors = tuple(sorted(request.survivors))
        return AggregateResult(
            int_sum=total,
            total=self.session.codec.dequantize_sum(total, len(survivors)),
            weight_sum=sum(masked[i].weight for i in survivors),
            survivors=survivors,
        )

    def _check_responses(self, request: UnmaskRequest, responses: Mapping[int, UnmaskResponse]) -> None:
        for h, r in responses.items():
            if r.holder != h or h not in request.survivors:
                raise SecAggError(f"response keyed {h} from holder {r.holder}: only surviving holders may answer")
            if not set(r.self_seeds) <= request.survivors or not set(r.mask_keys) <= request.dropped:
                raise SecAggError(
                    f"holder {h} revealed shares the request did not ask for; the server refuses to hold "
                    "a self-mask seed share of a dropped client or a mask-key share of a survivor"
                )
            if any(s.x != _point(h) for s in [*r.self_seeds.values(), *r.mask_keys.values()]):
                raise SecAggError(f"holder {h} sent shares that are not its own")

    def _sum_and_unmask(
        self, masked: Mapping[int, MaskedInput], responses: Mapping[int, UnmaskResponse],
        request: UnmaskRequest, length: int,
    ) -> torch.Tensor:
        bits, graph = self.session.codec.bits, self.session.neighbours
        total = torch.zeros(length, dtype=torch.int64)
        for i in sorted(request.survivors):
            seed = self._reconstruct(i, [r.self_seeds[i] for r in responses.values() if i in r.self_seeds])
            total = reduce(reduce(total + masked[i].vector, bits) - expand_mask(seed, length, bits), bits)
        for j in sorted(request.dropped):
            alive = sorted(graph[j] & request.survivors)
            if not alive:
                continue  # j's masks appear in no surviving input: leave its key secret
            key = self._reconstruct(j, [r.mask_keys[j] for r in responses.values() if j in r.mask_keys])
            if keys.public_key(key) != self.public_keys[j]:
                raise SecAggError(f"shares of client {j}'s mask key are inconsistent with its public key")
            for i, seed in keys.agree_all(key, {i: self.public_keys[i] for i in alive}).items():
                total = reduce(total - _pair_mask(seed, i, j, length, bits), bits)
        return total

    def _reconstruct(self, owner: int, shares: Sequence[shamir.Share]) -> bytes:
        t = self.session.threshold
        if len(shares) < t:
            raise SecAggError(f"only {len(shares)} shares of client {owner}'s secret arrived; threshold t={t}")
        value = shamir.reconstruct(shares[:t])
        if value >= 1 << (8 * SEED_BYTES):
            raise SecAggError(f"shares of client {owner}'s secret are inconsistent")
        return value.to_bytes(SEED_BYTES, "big")


def _rounding_generator(seed: int, client_id: int) -> torch.Generator:
    digest = hashlib.sha256(f"fedfm-secagg/rounding/{seed}/{client_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def secure_sum(
    vectors: Sequence[torch.Tensor], dropped: Collection[int] = frozenset(), *, bits: int = 32,
    clip_range: float = 1.0, max_dropout: float = 0.3, neighbours: int | None = None, seed: int = 0,
) -> torch.Tensor:
    """Run the whole protocol in-process; return the float64 sum of the survivors' vectors.

    Clients in ``dropped`` complete rounds 0-1 and then vanish: their masked input never
    arrives and they do not answer the unmasking request. All randomness (keys, seeds, shares,
    graph, rounding) derives from ``seed``, which makes this a simulation, not a deployment.

    Raises:
        SecAggError: if fewer clients survive than the threshold requires.
        ValueError: on a bad configuration or unknown dropped ids.
    """
    n = len(vectors)
    unknown = sorted(set(dropped) - set(range(n)))
    if unknown:
        raise ValueError(f"dropped clients {unknown} are not in [0, {n})")
    config = SecAggConfig(bits=bits, clip_range=clip_range, max_dropout=max_dropout, neighbours=neighbours)
    session, rng = Session.create(n, config, seed), SeededBytes(seed)
    clients = [SecAggClient.setup(i, session, rng) for i in range(n)]
    server = SecAggServer(session, {c.client_id: c.public_key for c in clients})
    inboxes = server.route_shares({c.client_id: c.share_secrets(rng) for c in clients})
    masked = {
        c.client_id: c.mask(vectors[c.client_id], server.keys_for(c.client_id),
                            generator=_rounding_generator(seed, c.client_id))
        for c in clients if c.client_id not in dropped
    }
    request = server.request_unmasking(masked)
    responses = {i: clients[i].respond(request, inboxes[i]) for i in sorted(request.survivors)}
    return server.unmask(masked, responses).total
