"""Build an experiment's components from its config: data, partitions, model, round plan."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from fedfm.config import ExperimentConfig
from fedfm.errors import DataError

if TYPE_CHECKING:
    from fedfm.data.tokenized import TokenizedTexts
    from fedfm.models.handle import ModelHandle
    from fedfm.round import RoundPlan
    from fedfm.types import NamedTensors, ServerState


@dataclass
class ClientData:
    """The federated view of the data, all as indices into one tokenized pool."""

    label_names: list[str]
    train: list[np.ndarray]  # per client
    local_test: Optional[list[np.ndarray]]  # per client, when eval.per_client
    test: np.ndarray


def prepare_data(cfg: ExperimentConfig):  # type: ignore[no-untyped-def]
    """Load, deduplicate, subsample, split and partition. Returns (LabeledTexts, ClientData)."""
    from fedfm.data.partition import partition
    from fedfm.data.sources import load_source
    from fedfm.data.split import dedupe, train_test_split

    d = cfg.data
    data = load_source(d.name, d.text_column, d.label_column, d.group_column)
    if d.dedupe:
        data = dedupe(data)
    if d.max_examples is not None and d.max_examples < len(data):
        keep = np.random.default_rng([cfg.seed, 0xDA7A]).choice(len(data), d.max_examples, replace=False)
        data = data.subset(np.sort(keep))
    if data.num_classes < 2:
        raise DataError(f"dataset {d.name!r} has {data.num_classes} label value(s); classification needs >= 2")
    train, test = train_test_split(data, d.test_fraction, d.test_by_group, cfg.seed)
    if cfg.eval.max_examples is not None and cfg.eval.max_examples < len(test):
        rng = np.random.default_rng([cfg.seed, 0xE7A1])
        test = np.sort(rng.choice(test, cfg.eval.max_examples, replace=False))
    groups = None if data.groups is None else data.groups[train]
    parts = [train[p] for p in partition(data.labels[train], groups, cfg.federation.clients, cfg.seed, cfg.partition)]
    local_test = None
    if cfg.eval.per_client:
        parts, local_test = _local_splits(parts, cfg.eval.client_test_fraction, cfg.seed)
    return data, ClientData(label_names=data.label_names, train=parts, local_test=local_test, test=test)


def _local_splits(parts: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    train, test = [], []
    for c, idx in enumerate(parts):
        perm = np.random.default_rng([seed, c, 0x10CA]).permutation(idx)
        n_test = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        test.append(np.sort(perm[:n_test]))
        train.append(np.sort(perm[n_test:]))
    return train, test


def build_model(cfg: ExperimentConfig, num_labels: int):  # type: ignore[no-untyped-def]
    """The shared model with its adapter applied, as a ModelHandle."""
    import fedfm.adapters  # noqa: F401  (registration)
    from fedfm.adapters.base import ADAPTERS
    from fedfm.models.handle import ModelHandle
    from fedfm.models.load import load_classifier
    from fedfm.models.presets import resolve

    adapter = ADAPTERS.get(cfg.adapter.method)
    model, tok = load_classifier(cfg.model.name, num_labels, cfg.seed)
    model = adapter.apply(model, cfg.adapter, resolve(cfg.model.name))
    return ModelHandle.wrap(model, tok)


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
    tokens: TokenizedTexts  # the whole (deduplicated) dataset, tokenized once
    clients: ClientData
    plan: RoundPlan

    @classmethod
    def build(cls, cfg: ExperimentConfig) -> "Experiment":
        from fedfm.aggregators import build_aggregator
        from fedfm.algorithms import build_algorithm
        from fedfm.data.tokenized import tokenize
        from fedfm.round import RoundPlan
        from fedfm.runtime.inprocess import InProcessRuntime
        from fedfm.trainers.local import LocalTrainer

        set_threads(cfg)
        algorithm, aggregator = build_algorithm(cfg.algorithm), build_aggregator(cfg.aggregator)
        data, clients = prepare_data(cfg)
        handle = build_model(cfg, data.num_classes)
        tokens = tokenize(data.texts, data.labels, handle.tokenizer, cfg.model.max_length)
        trainer = LocalTrainer(handle, tokens, clients.train, cfg.client, algorithm)
        plan = RoundPlan(algorithm=algorithm, aggregator=aggregator, runtime=InProcessRuntime(trainer),
                         num_clients=cfg.federation.clients, clients_per_round=cfg.federation.clients_per_round,
                         seed=cfg.seed)
        return cls(cfg=cfg, handle=handle, tokens=tokens, clients=clients, plan=plan)

    def initial_state(self) -> ServerState:
        from fedfm.types import ServerState

        params = self.handle.get_params()
        return ServerState(round=0, params=params, opt_state=self.plan.algorithm.init_state(params))

    def evaluate(self, params: NamedTensors) -> dict:
        """Global-model metrics on the test set (and per client, if configured)."""
        from fedfm.evaluate import evaluate

        self.handle.set_params(params)
        bs = self.cfg.eval.batch_size
        out: dict = evaluate(self.handle, self.tokens, self.clients.test, bs)
        if self.clients.local_test is not None:
            per = [evaluate(self.handle, self.tokens, idx, bs)["accuracy"] if len(idx) else float("nan")
                   for idx in self.clients.local_test]
            out["client_accuracy"] = per
            finite = [a for a in per if a == a]
            out["client_accuracy_mean"] = float(np.mean(finite)) if finite else float("nan")
            out["client_accuracy_min"] = float(np.min(finite)) if finite else float("nan")
        return out
