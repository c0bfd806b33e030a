"""Build an experiment's components from its config: data roles, model, round plan, trainers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, MutableMapping, Optional

import numpy as np

from fedfm.config import ExperimentConfig
from fedfm.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fedfm.data.roles import DataRoles
    from fedfm.data.images import ImageTensors
    from fedfm.data.tokenized import LMTexts, TokenizedTexts
    from fedfm.models.handle import ModelHandle
    from fedfm.round import RoundPlan
    from fedfm.runtime.base import Runtime
    from fedfm.trainers.local import LocalTrainer
    from fedfm.types import NamedTensors, ServerState

SERVER = -1
"""Client id of the server when it trains on public data (central stages)."""


def prepare_data(cfg: ExperimentConfig) -> "DataRoles":
    """Every data role of ``cfg`` as index sets into one pool (see fedfm.data.roles)."""
    from fedfm.data.roles import prepare_roles

    return prepare_roles(cfg)


def build_model(cfg: ExperimentConfig, num_labels: int) -> "ModelHandle":
    """The shared model with its adapter applied, as a ModelHandle."""
    import fedfm.adapters  # noqa: F401  (registration)
    from fedfm.adapters.base import ADAPTERS
    from fedfm.models.handle import ModelHandle
    from fedfm.models.load import load_model
    from fedfm.models.presets import resolve

    adapter = ADAPTERS.get(cfg.adapter.method)
    model, tok = load_model(cfg.model.name, cfg.task, cfg.seed, num_labels)
    settings = cfg.adapter
    if cfg.adapter.method == "lora" and not isinstance(cfg.adapter.rank, int):  # per-client ranks: build at the largest
        settings = cfg.adapter.model_copy(update={"rank": cfg.adapter.max_rank(cfg.clients.tiers)})
    model = adapter.apply(model, settings, resolve(cfg.model.name))
    if cfg.personalization.method == "personal-lora":
        from fedfm.personalization import add_personal_adapter

        p = cfg.personalization
        model = add_personal_adapter(model, p.rank, cfg.adapter.alpha,
                                     cfg.adapter.targets or list(resolve(cfg.model.name).lora_targets))
    return ModelHandle.wrap(model, tok)


def encode_pool(cfg: ExperimentConfig, pool: Any, handle: "ModelHandle") -> Any:
    """Model-ready tensors of the whole pool: tokenized texts (classification or LM) or images.

    Raises:
        ModelError: the model's modality (text or images) differs from the data's.
    """
    from fedfm.data.images import is_image_pool, to_tensors
    from fedfm.data.tokenized import tokenize_for
    from fedfm.errors import ModelError

    takes_images = handle.tokenizer is None
    if is_image_pool(pool) != takes_images:
        what = "images" if takes_images else "text"
        raise ModelError(f"model {cfg.model.name!r} takes {what} but dataset {cfg.private_data!r} holds "
                         f"{'text' if takes_images else 'images'}; pick a model and data of the same kind "
                         "(vit-tiny/vit-small for images)")
    if takes_images:
        return to_tensors(pool)
    return tokenize_for(cfg.task, pool.texts, pool.labels, handle.tokenizer, cfg.model.max_length)


def set_threads(cfg: ExperimentConfig) -> None:
    import warnings

    import torch

    # transformers 5 deprecation noise raised from inside peft; not actionable by users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    torch.set_num_threads(cfg.runtime.threads or os.cpu_count() or 1)


@dataclass
class Experiment:
    """Everything a run needs, built once from the config."""

    cfg: ExperimentConfig
    handle: ModelHandle
    tokens: TokenizedTexts | LMTexts | ImageTensors  # the whole pool, encoded once
    data: DataRoles
    plan: RoundPlan
    central: Optional[LocalTrainer]  # the server's trainer on public data, if any
    client_states: Optional[MutableMapping[int, dict[str, torch.Tensor]]] = None
    """The in-process runtime's per-client pipeline state (checkpointed); None with an outside runtime."""
    attack: Any = None
    """The simulated attack (fedfm.attacks.Attack), if the config has one."""

    @classmethod
    def build(cls, cfg: ExperimentConfig, runtime: Optional["Runtime"] = None) -> "Experiment":
        """Build everything; ``runtime`` replaces the in-process runtime (e.g. Flower's)."""
        from fedfm.aggregators import build_aggregator
        from fedfm.adapters.ranks import BaseMerger
        from fedfm.federation import build_system
        from fedfm.pipeline import build_pipeline
        from fedfm.round import RoundPlan
        from fedfm.runtime.inprocess import InProcessRuntime
        from fedfm.trainers.local import LocalTrainer

        data, handle, tokens, trainer = build_client_side(cfg)
        pipeline = build_pipeline(cfg, [len(idx) for idx in data.train])
        inprocess: Any = None
        if runtime is None:
            states = _state_store(cfg)
            if cfg.runtime.workers > 1:
                from fedfm.runtime.multiprocess import MultiProcessRuntime

                inprocess = MultiProcessRuntime(trainer, pipeline, cfg.runtime.workers, client_states=states)
            else:
                inprocess = InProcessRuntime(trainer, pipeline, states)
        downlink = None
        if cfg.compression.downlink.enabled:
            from fedfm.compression import build_compressor
            from fedfm.compression.downlink import Downlink

            if runtime is not None:
                raise ConfigError("compression.downlink is simulated by the in-process runtimes (the server keeps "
                                  "each client's replica); a runtime given from outside (Flower) sends the dense state")
            d = cfg.compression.downlink
            downlink = Downlink(build_compressor(d.names, d.bits, d.fraction, d.rank), _state_store(cfg))
        plan = RoundPlan(algorithm=trainer.algorithm, aggregator=build_aggregator(cfg.aggregator),
                         runtime=runtime or inprocess, num_clients=cfg.federation.clients,  # type: ignore[arg-type]
                         clients_per_round=cfg.federation.clients_per_round, seed=cfg.seed, pipeline=pipeline,
                         max_update_norm=cfg.aggregator.reject_norm,
                         system=build_system(cfg, [len(idx) for idx in data.train]), lora=_lora_strategy(cfg, handle),
                         lora_scaling=cfg.adapter.alpha / cfg.adapter.max_rank(cfg.clients.tiers),
                         merge_base=BaseMerger(handle.model), downlink=downlink)
        central = None
        if data.public is not None:
            central = LocalTrainer(handle, tokens, {SERVER: data.public}, central_config(cfg), _NoRegularizer())
        return cls(cfg=cfg, handle=handle, tokens=tokens, data=data, plan=plan, central=central,
                   client_states=inprocess.client_states if inprocess is not None else None,
                   attack=trainer.attack)

    def close(self) -> None:
        """Stop worker processes and remove spilled client states (the runner calls this at the end)."""
        for obj in (self.plan.runtime, self.client_states, self.replicas):
            close = getattr(obj, "close", None)
            if close is not None:
                close()

    @property
    def replicas(self) -> Any:
        """Downlink compression's per-client replicas (checkpointed), None without it."""
        return None if self.plan.downlink is None else self.plan.downlink.replicas

    @property
    def personal(self) -> Any:
        """The personalization (fedfm.personalization), None without one."""
        return getattr(self.plan.runtime, "trainer", None) and getattr(self.plan.runtime.trainer, "personal", None)

    def load_global(self, params: NamedTensors) -> None:
        """Put the global params in the model (with personalization: the shared part, and the
        initial personal values for the rest)."""
        pers = self.personal
        if pers is None:
            self.handle.set_params(params)
        else:
            self.handle.set_params({**pers.initial, **params}, partial=True)

    def restore(self, state: ServerState) -> None:
        """Bring the shared model in line with a loaded checkpoint: FLoRA's merged base weights."""
        from fedfm.adapters.ranks import MERGED

        merged = {k[len(MERGED):]: v for k, v in state.opt_state.items() if k.startswith(MERGED)}
        if merged and self.plan.merge_base is not None:
            self.plan.merge_base(merged)

    def initial_state(self) -> ServerState:
        from fedfm.types import ServerState

        params = self.handle.get_params()
        if self.personal is not None:  # personal parameters never reach the server
            params = {k: params[k] for k in self.personal.shared_names(self.handle)}
        if self.plan.downlink is not None:  # what every client holds before its first download
            self.plan.downlink.start(params)
        return ServerState(round=0, params=params, opt_state=self.plan.algorithm.init_state(params),
                           extra=self.plan.pipeline.initial_extra())

    def validation_loss(self, params: NamedTensors) -> Optional[float]:
        """Loss on the clients' held-out validation examples (None when none are held out).
        In a deployment each client reports its local loss; the example-weighted mean of those
        equals this loss on the union."""
        from fedfm.evaluate import evaluate

        val = self.data.val_all
        if not len(val):
            return None
        self.load_global(params)
        return float(evaluate(self.handle, self.tokens, val, self.cfg.eval.batch_size)["loss"])

    def evaluate(self, params: NamedTensors) -> dict:
        """Global-model metrics on the test set, and per-client accuracy when configured."""
        from fedfm.evaluate import evaluate

        bs = self.cfg.eval.batch_size
        if self.personal is not None:
            from fedfm.personalization import evaluate_personal
            from fedfm.runtime.client import split_state

            return evaluate_personal(self.handle, self.tokens, self.data.local_test, self.client_states or {}, params,
                                     self.personal, bs, lambda state: split_state(state)[2])
        self.handle.set_params(params)
        out: dict = evaluate(self.handle, self.tokens, self.data.test, bs)
        if self.data.local_test is not None:
            per = [evaluate(self.handle, self.tokens, idx, bs)["accuracy"] if len(idx) else float("nan")
                   for idx in self.data.local_test]
            out["client_accuracy"] = per
            sizes = [len(idx) for idx in self.data.local_test]
            # pooled: the accuracy on the union of the clients' held-out data
            out["local_accuracy"] = float(sum(a * n for a, n in zip(per, sizes) if n) / max(sum(sizes), 1))
            finite = [a for a in per if a == a]
            out["client_accuracy_mean"] = float(np.mean(finite)) if finite else float("nan")
            out["client_accuracy_min"] = float(np.min(finite)) if finite else float("nan")
        if self.attack is not None and getattr(self.attack, "data", None) is not None \
                and hasattr(self.attack.data, "triggered"):
            from fedfm.attacks.data import backdoor_success_rate

            # share of triggered test examples (true label != target) classified as the target
            out["backdoor_success"] = backdoor_success_rate(self.handle, self.tokens, self.data.test,
                                                            self.attack.data, batch_size=bs)
        return out


def build_client_side(cfg: ExperimentConfig) -> "tuple[DataRoles, ModelHandle, Any, LocalTrainer]":
    """What every client needs, built the same way wherever it runs: the data roles (clients'
    partitions are a pure function of the config), the model with its adapter, the encoded pool,
    and the local trainer over all clients' partitions."""
    from fedfm.algorithms import build_algorithm
    from fedfm.trainers.local import LocalTrainer

    set_threads(cfg)
    data = prepare_data(cfg)
    handle = build_model(cfg, data.pool.num_classes)
    tokens = encode_pool(cfg, data.pool, handle)
    clients = dict(enumerate(data.train))
    algorithm = build_algorithm(cfg.algorithm, cfg.client, cfg.federation.clients)
    attack, pool = None, tokens
    if cfg.attack.name != "none":  # simulation only: the runtime never imports fedfm.attacks
        from fedfm.attacks import AttackSpec, build_attack

        try:
            spec = AttackSpec(**cfg.attack.model_dump())
            attack = build_attack(spec, num_clients=cfg.federation.clients,
                                  clients_per_round=cfg.federation.clients_per_round,
                                  num_classes=data.pool.num_classes, seed=cfg.seed, tokenizer=handle.tokenizer)
            pool = attack.wrap(tokens, clients)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.privacy.mechanism == "dpsgd":
        from fedfm.pipeline import noise_multiplier
        from fedfm.trainers.dpsgd import DPSGDTrainer

        z = noise_multiplier(cfg, [len(idx) for idx in data.train])
        trainer: LocalTrainer = DPSGDTrainer(handle, pool, clients, cfg.client, algorithm, attack,
                                             noise_multiplier=z, max_grad_norm=cfg.privacy.clip)
    else:
        trainer = LocalTrainer(handle, pool, clients, cfg.client, algorithm, attack)
    from fedfm.personalization import build_personalization

    trainer.personal = build_personalization(cfg, handle)
    a = cfg.adapter
    if a.method == "lora" and a.aggregation == "hetlora" and a.self_prune:
        from fedfm.adapters.ranks import SelfPruning

        trainer.pruning = SelfPruning(lam=a.prune_lam, gamma=a.prune_gamma, min_rank=a.min_rank)
        trainer.max_rank = a.max_rank(cfg.clients.tiers)
    if cfg.runtime.name == "inprocess" and cfg.runtime.vectorize is not False:
        trainer = _vectorized(cfg, trainer)
    return data, handle, tokens, trainer


def _vectorized(cfg: ExperimentConfig, trainer: "LocalTrainer") -> "LocalTrainer":
    """The trainer that trains a cohort in one batched call, if ``runtime.vectorize`` asks for it
    and it applies; otherwise ``trainer`` (the reason is logged)."""
    import dataclasses
    import logging

    from fedfm.trainers.local import LocalTrainer
    from fedfm.trainers.vectorized import VectorizedTrainer, should_vectorize

    ok, why = should_vectorize(cfg.runtime.vectorize, trainer.handle.model, trainer, cfg.federation.clients_per_round)
    logging.getLogger("fedfm.vectorized").info("vectorised clients %s: %s", "on" if ok else "off", why)
    if not ok:
        if cfg.runtime.vectorize is True:
            logging.getLogger("fedfm.vectorized").warning("runtime.vectorize = true does not apply, "
                                                          "training sequentially: %s", why)
        return trainer
    fields = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(LocalTrainer)}
    return VectorizedTrainer(**fields)


def _lora_strategy(cfg: ExperimentConfig, handle: "ModelHandle") -> Any:
    """The LoRA-aware aggregation that replaces the aggregator (hetlora, flexlora), or None."""
    if cfg.adapter.method != "lora" or cfg.adapter.aggregation not in ("hetlora", "flexlora", "flora"):
        return None
    from fedfm.adapters.lora_aggregation import LORA_AGGREGATIONS
    from fedfm.adapters.ranks import check_rank_fits

    if cfg.adapter.aggregation == "flexlora":
        check_rank_fits(handle, cfg.adapter.max_rank(cfg.clients.tiers), "flexlora")
    return LORA_AGGREGATIONS.get(cfg.adapter.aggregation)


def central_config(cfg: ExperimentConfig):  # type: ignore[no-untyped-def]  # type: ignore[no-untyped-def]
    """The server's local-training settings: client settings with the schedule's step count,
    learning rate and batch size (epochs are unbounded: the step count rules)."""
    s = cfg.schedule
    return cfg.client.model_copy(update=dict(
        max_steps=s.central_steps, epochs=10**6, lr=s.central_lr or cfg.client.lr,
        batch_size=s.central_batch_size or cfg.client.batch_size))


class _NoRegularizer:
    """Central training minimizes the plain loss (no FedProx term at the server)."""

    def client_regularizer(self, params, anchor, payload):  # type: ignore[no-untyped-def]
        return None


def _state_store(cfg: ExperimentConfig) -> Any:
    """A per-client store in RAM up to ``runtime.client_state_mb``, the rest on disk."""
    from fedfm.runtime.store import ClientStateStore

    budget = cfg.runtime.client_state_mb
    return ClientStateStore(memory_budget=None if budget is None else int(budget * 2**20))
