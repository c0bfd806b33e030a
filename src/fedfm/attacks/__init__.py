"""Simulation-only adversaries: malicious clients that poison their updates or their data.

Never imported by runtime code; the experiment builds an :class:`Attack` and hands its two hooks
to the pieces that need them (typed by duck, so runtimes stay free of this package).

Attacks (``attack.name``):

=================  =========================================================================
sign-flip          update: -scale * delta (default scale 1)
scale              update: scale * delta (default scale 10), boosting
noise              update: replaced by N(0, noise_std^2)
label-flip         data: labels -> target_label, or (y + 1) mod num_classes
backdoor           data: BadNets trigger (text: token ids after [CLS]; images: white patch)
                   and label -> target_label, on poison_fraction of each malicious client's data
model-replacement  data: the backdoor; update: boost * delta (default boost: clients per round)
=================  =========================================================================

How to hook it in (the lead's wiring)::

    from fedfm.attacks import AttackSpec, build_attack

    spec = AttackSpec(**cfg.attack.model_dump())       # the config mirrors AttackSpec's fields
    attack = build_attack(spec, num_clients=cfg.federation.clients,
                          clients_per_round=cfg.federation.clients_per_round,
                          num_classes=data.pool.num_classes, seed=cfg.seed,
                          tokenizer=handle.tokenizer)   # None for image models

    # 1. data (experiment.build_client_side): the clients' trainer gets the wrapped pool; the
    #    central trainer on public data and the evaluator keep the unwrapped ``tokens``.
    client_pool = attack.wrap(tokens, dict(enumerate(data.train)))
    trainer = LocalTrainer(handle, client_pool, dict(enumerate(data.train)), cfg.client, algorithm)

    # 2. update (UpdatePipeline.client_step, first thing, before the finite check and clipping):
    delta = attack.apply_update(task.client_id, delta, generator(task.seed, _CLIENT_ATTACK))
    #    (a new generator purpose next to _CLIENT_NOISE/_CLIENT_CODEC); store ``attack`` as an
    #    optional pipeline field (None = no attack), so Flower's ClientApp, which rebuilds the
    #    pipeline from the config, attacks identically.

    # 3. evaluation (optional, backdoor and model-replacement): on the unwrapped test pool,
    backdoor_success_rate(handle, tokens, data.test, attack.data)

Both hooks are pure functions of (client id, seed, example index), so every runtime sees the same
malicious clients, the same poisoned examples in every round, and the same malicious deltas.
``attack.malicious`` is the fixed malicious set (for reports). The trainer needs no change:
:class:`PoisonedData` has the pool's ``batch(idx, rng)``, ``labels``, ``lengths`` and ``len``.
"""

from fedfm.attacks import data, update  # noqa: F401  (registration)
from fedfm.attacks.base import (
    ATTACK_NAMES,
    DATA_ATTACKS,
    DEFAULT_TRIGGER,
    UPDATE_ATTACKS,
    Attack,
    AttackSpec,
    DataAttack,
    UpdateAttack,
    build_attack,
    malicious_clients,
)
from fedfm.attacks.data import (
    Backdoor,
    LabelFlip,
    PoisonedData,
    backdoor_success_rate,
    insert_after_first,
    poisoned_examples,
    trigger_ids,
    triggered,
)
from fedfm.attacks.update import GaussianNoise, ModelReplacement, Scale, SignFlip

__all__ = [
    "ATTACK_NAMES",
    "DATA_ATTACKS",
    "DEFAULT_TRIGGER",
    "UPDATE_ATTACKS",
    "Attack",
    "AttackSpec",
    "Backdoor",
    "DataAttack",
    "GaussianNoise",
    "LabelFlip",
    "ModelReplacement",
    "PoisonedData",
    "Scale",
    "SignFlip",
    "UpdateAttack",
    "backdoor_success_rate",
    "build_attack",
    "insert_after_first",
    "malicious_clients",
    "poisoned_examples",
    "trigger_ids",
    "triggered",
]
