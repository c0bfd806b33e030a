"""Experiment configuration: typed, strict, one TOML file per experiment.

Every section forbids unknown keys and checks types and ranges at load time, so a
typo or a bad value fails before any work, with a message naming the key, the
value and what is allowed. ``--set key=value`` overrides any key.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedfm.errors import ConfigError, FedfmError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(_Section):
    name: str = "minilm-l6"
    """A preset (see `fedfm models`), a local directory, or a hub name (online machines only)."""
    max_length: int = Field(48, ge=4, le=4096)
    """Tokens per example after truncation."""


class AdapterConfig(_Section):
    method: Literal["full", "head", "lora", "prompt", "ptuning", "prefix"] = "lora"
    rank: Union[int, list[int], Literal["tiers"]] = 8
    """LoRA rank: one for every client, one per client (a list as long as federation.clients), or
    "tiers" (each client's tier's rank, clients.tiers). Heterogeneous ranks are simulated by one
    model at the largest rank in which a client of rank r trains only the first r components (the
    rest held at zero, the same scaling alpha / r_max for all, so zero-padding is exact) and sends
    and receives only those (bytes counted at its rank)."""
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Optional[list[str]] = None
    """Module names LoRA wraps; None = the model preset's default (e.g. query, value)."""
    train_head: bool = True
    """LoRA: also train (and send) the task head, as a classifier head starts untrained."""
    virtual_tokens: int = Field(20, ge=1, le=512)
    """prompt/ptuning/prefix: number of virtual prompt tokens."""
    encoder_hidden: int = Field(128, ge=1)
    """ptuning: hidden size of the prompt encoder (the prompt generator)."""
    aggregation: Literal["naive", "ffa", "fedsa", "flora", "hetlora", "flexlora"] = "naive"
    """lora: how clients' factors combine (fedfm.adapters.lora_aggregation). naive: FedAvg of A and
    of B apart (mean(B) @ mean(A) is not the mean update; zero-padded with heterogeneous ranks);
    ffa: FFA-LoRA (Sun et al. 2024), A frozen at its seeded initialization and never sent, only B
    (and the head) train, so the mean of B @ A is exact; hetlora: HetLoRA (Cho et al. 2024),
    zero-padded factors averaged with sparsity weights; flexlora: FlexLoRA (Bai et al. 2024), the
    exact mean of B_i @ A_i redistributed by truncated SVD at each client's rank; fedsa: FedSA-LoRA
    (Guo et al. 2025), A shared and averaged, B kept by each client (evaluated per client); flora:
    FLoRA (Wang et al. 2024), the clients' factors stacked so their sum is exact, merged into the
    frozen base weights, fresh factors every round (clients download the stack: bytes grow with the
    cohort)."""

    self_prune: bool = True
    """hetlora: clients regularize their trailing rank components and drop them once that tail
    shrinks (HetLoRA's rank self-pruning); false = fixed ranks."""
    prune_lam: float = Field(0.01, ge=0)
    """hetlora: weight of the tail-norm regularizer ||B_t A_t||_F."""
    prune_gamma: float = Field(0.99, gt=0, lt=1)
    """hetlora: decaying factor; the tail starts at max(floor(gamma * r), min_rank)."""
    min_rank: int = Field(1, ge=1)
    """hetlora: no client prunes below this rank."""

    @field_validator("rank")
    @classmethod
    def _ranks_positive(cls, v: Any) -> Any:
        values = v if isinstance(v, list) else [] if v == "tiers" else [v]
        if isinstance(v, list) and not v:
            raise ValueError("adapter.rank is an empty list; give one rank per client")
        bad = [r for r in values if not (isinstance(r, int) and 1 <= r <= 1024)]
        if bad:
            raise ValueError(f"adapter.rank values must be integers in 1..1024, got {bad}")
        return v

    @model_validator(mode="after")
    def _aggregation_needs_lora(self) -> "AdapterConfig":
        if self.aggregation != "naive" and self.method != "lora":
            raise ValueError(f"adapter.aggregation={self.aggregation!r} combines LoRA factors; it needs "
                             f"adapter.method='lora' (got {self.method!r})")
        if self.heterogeneous and self.method != "lora":
            raise ValueError(f"a per-client adapter.rank ({self.rank!r}) needs adapter.method='lora' "
                             f"(got {self.method!r})")
        if self.heterogeneous and self.aggregation == "ffa":
            raise ValueError("adapter.aggregation='ffa' freezes A at one shared initialization, defined for one "
                             "rank; with per-client ranks use naive, hetlora or flexlora")
        return self

    @property
    def heterogeneous(self) -> bool:
        return self.rank == "tiers" or (isinstance(self.rank, list) and len(set(self.rank)) > 1)

    def max_rank(self, tiers: "Sequence[Any]" = ()) -> int:
        """The rank the shared model is built at: the largest any client uses."""
        if self.rank == "tiers":
            return max(t.rank for t in tiers) if tiers else 8
        return max(self.rank) if isinstance(self.rank, list) else int(self.rank)


class DataConfig(_Section):
    name: str = "rotten-tomatoes"
    """The private dataset, partitioned over clients: a bundled dataset (`fedfm data list`, with an
    optional group filter such as vader:tweets+nyt), a local .csv/.json/.jsonl/.parquet file, or hf:ORG/NAME."""
    private: Optional[str] = None
    """Alias of `name` (the FFM papers' term); set one of the two."""
    public: Optional[str] = None
    """Dataset held by the server for central phases (same forms as `name`), or "share" for a
    `public_fraction` share of the private training pool."""
    public_fraction: float = Field(0.1, gt=0, lt=1)
    public_max_examples: Optional[int] = Field(None, ge=1)
    test: Optional[str] = None
    """Test set: None = a held-out split of the private data; else a dataset used whole."""
    val_fraction: Optional[float] = Field(None, ge=0, lt=1)
    """Share of each client's data held out for validation (what adaptive policies watch);
    None = 0.1 under adaptive/bandit schedules, 0 otherwise."""
    max_examples: Optional[int] = Field(None, ge=2)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    test_by_group: bool = False
    """Hold out whole groups (e.g. movies) for the test set instead of random examples."""
    text_column: str = "text"
    label_column: str = "label"
    group_column: Optional[str] = None
    """Column for the natural partition of a local file (bundled sets define their own)."""
    dedupe: bool = True
    """Drop repeated texts so no test text also sits in training."""


class ScheduleConfig(_Section):
    """Central (server, public data) and federated (clients, private data) phases."""

    policy: Literal["fixed", "adaptive", "bandit"] = "fixed"
    central_steps: int = Field(0, ge=0)
    """Server optimizer steps per central stage; 0 = no central phase (plain FL)."""
    central_stages: int = Field(1, ge=1)
    """fixed: central stages per central phase."""
    rounds_per_phase: int = Field(1, ge=1)
    """fixed: federated rounds per federated phase."""
    start: Literal["central", "federated"] = "central"
    threshold: float = Field(0.01, ge=0)
    """adaptive: switch when validation-loss improvement over `window` evaluations is below this."""
    window: int = Field(2, ge=1)
    patience: int = Field(1, ge=1)
    min_phase: int = Field(1, ge=1)
    exploration: float = Field(0.5, ge=0)
    """bandit: UCB exploration weight c."""
    budget_rounds: Optional[int] = Field(None, ge=1)
    """Cap on stages (central stages + federated rounds); federated rounds are also capped by federation.rounds."""
    budget_compute: Optional[float] = Field(None, gt=0)
    """Cap on training examples processed (server + clients)."""
    central_lr: Optional[float] = Field(None, gt=0)
    """Server learning rate (None = client.lr)."""
    central_batch_size: Optional[int] = Field(None, ge=1)
    """Server batch size (None = client.batch_size)."""


class PartitionConfig(_Section):
    method: Literal["iid", "dirichlet", "shards", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration: small = skewed labels, large = close to IID."""
    shards_per_client: int = Field(2, ge=1)
    """Shards: number of label shards (so at most this many classes) per client."""
    min_size: int = Field(1, ge=0)
    """Dirichlet: resample until every client holds at least this many examples."""


class FederationConfig(_Section):
    clients: int = Field(10, ge=1)
    clients_per_round: int = Field(10, ge=1)
    rounds: int = Field(5, ge=1)
    """Rounds (sync) or server aggregations (async)."""
    mode: Literal["sync", "async"] = "sync"
    """sync: rounds of a sampled cohort; async: buffered asynchronous aggregation (FedBuff, Nguyen
    et al. 2022): ``concurrency`` clients train at once, the server steps every ``buffer`` arrivals."""
    deadline: Optional[float] = Field(None, gt=0)
    """sync: a round lasts at most this many simulated seconds (see [clients]); None = no deadline."""
    stragglers: Literal["drop", "partial"] = "drop"
    """Clients that cannot finish their local steps by the deadline: dropped, or their partial work
    used (the steps they complete; pair with algorithm "fednova" to normalise it)."""
    buffer: Optional[int] = Field(None, ge=1)
    """async: arrivals per server step (FedBuff's K); None = clients_per_round."""
    concurrency: Optional[int] = Field(None, ge=1)
    """async: clients training at once; None = min(clients, 2 * buffer)."""
    staleness: Literal["polynomial", "constant", "hinge"] = "polynomial"
    """async: weight of an update computed on a model s versions old: (1 + s)^-a, 1, or hinge."""
    staleness_exponent: float = Field(0.5, gt=0)
    """async: a in (1 + s)^-a (FedBuff uses 0.5)."""

    @property
    def buffer_size(self) -> int:
        return self.buffer or self.clients_per_round

    @property
    def in_flight(self) -> int:
        return self.concurrency or min(self.clients, 2 * self.buffer_size)

    @model_validator(mode="after")
    def _cohort_fits(self) -> "FederationConfig":
        if self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds clients={self.clients}; "
                "allowed: 1..clients"
            )
        if self.mode == "async":
            if self.in_flight > self.clients:
                raise ValueError(f"federation.concurrency={self.in_flight} exceeds clients={self.clients}")
            if self.buffer_size > self.in_flight:
                raise ValueError(f"federation.buffer={self.buffer_size} exceeds federation.concurrency="
                                 f"{self.in_flight}: the server would wait for more arrivals than clients in flight")
            if self.deadline is not None:
                raise ValueError("federation.deadline applies to sync rounds; async mode has no rounds to cut "
                                 "(set federation.mode=\"sync\" or drop the deadline)")
        return self


class TierConfig(_Section):
    share: float = Field(gt=0, le=1)
    """Fraction of clients in this tier."""
    speed: float = Field(1.0, gt=0)
    """Relative compute speed (1.0 takes clients.step_s simulated seconds per local step)."""
    rank: Optional[int] = Field(None, ge=1)
    """LoRA rank of this tier's clients (with adapter.rank = "tiers")."""


class PersonalizationConfig(_Section):
    """A model of each client's own (fedfm.personalization); evaluated on each client's held-out data."""

    method: Literal["none", "fedper", "fedrep", "ditto", "personal-lora"] = "none"
    """fedper/fedrep: the task head stays local (fedrep trains it first, then the body); ditto: a
    personal copy of the model pulled toward the global one; personal-lora: a second, personal
    LoRA adapter beside the shared one."""
    head_steps: int = Field(5, ge=1)
    """fedrep: local steps on the head alone before the body's steps."""
    lam: float = Field(0.1, ge=0)
    """ditto: weight of the proximal term lam/2 ||v - w||^2."""
    personal_steps: Optional[int] = Field(None, ge=1)
    """ditto: steps on the personal model per round (None = as many as on the global model)."""
    rank: int = Field(4, ge=1, le=1024)
    """personal-lora: rank of the personal adapter."""


class ClientsConfig(_Section):
    """System heterogeneity of the simulated clients (fedfm.system)."""

    speed: Union[float, list[float], Literal["tiers"]] = 1.0
    """Relative compute speed: one value, one per client, or "tiers" (from clients.tiers)."""
    availability: Union[float, list[float]] = 1.0
    """Probability a sampled client is reachable in a round (one value or one per client); an
    unreachable client drops out of the round."""
    tiers: list[TierConfig] = []
    """Device classes, e.g. [{share = 0.5, speed = 1.0, rank = 16}, {share = 0.5, speed = 0.25, rank = 4}]."""
    step_s: float = Field(1.0, gt=0)
    """Simulated seconds of one local step at speed 1.0."""
    bandwidth: Optional[float] = Field(None, gt=0)
    """Bytes per simulated second each way; None = transfers take no simulated time."""


class ClientConfig(_Section):
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    """Cap on local optimizer steps per round (None = run all epochs)."""
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    """SGD momentum (client side)."""
    grad_clip: Optional[float] = Field(None, gt=0)


class AlgorithmConfig(_Section):
    name: Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova"] = "fedavg"
    """scaffold: control variates correct client drift (Karimireddy et al. 2020; needs client.optimizer
    "sgd"); fednova: updates normalised by local work (Wang et al. 2020), for unequal step counts."""
    mu: float = Field(0.01, ge=0)
    """FedProx proximal weight."""
    server_lr: Optional[float] = Field(None, gt=0)
    """Server step size; None = the algorithm's default (1.0 for FedAvg/FedProx/FedAvgM, 0.01 adaptive)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """FedAvgM server momentum."""
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    """Adaptivity (epsilon) of FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021)."""


class AggregatorConfig(_Section):
    name: Literal["mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "norm-bound"] = "mean"
    """mean: weighted mean (FedAvg); the others are robust to Byzantine clients."""
    weighting: Literal["examples", "uniform"] = "examples"
    """Weights of the mean (and of norm-bound's mean); the robust rules treat updates equally."""
    f: int = Field(0, ge=0)
    """Byzantine clients tolerated per round (krum, multi-krum, bulyan)."""
    trim: float = Field(0.1, ge=0, lt=0.5)
    """trimmed-mean: the fraction cut from each end, per coordinate."""
    select: Optional[int] = Field(None, ge=1)
    """multi-krum: updates averaged (default n - f)."""
    max_norm: float = Field(1.0, gt=0)
    """norm-bound: updates with a larger L2 norm are scaled down to it before the mean."""
    reject_norm: Optional[float] = Field(1e6, gt=0)
    """Any rule: updates with a larger L2 norm are rejected as malformed, with the reason logged
    (a sanity bound against broken clients, not a defense; None = no bound)."""


class EvalConfig(_Section):
    every: int = Field(1, ge=1)
    """Evaluate the global model every this many rounds (and always after the last)."""
    batch_size: int = Field(128, ge=1)
    max_examples: Optional[int] = Field(None, ge=1)
    per_client: bool = False
    """Also evaluate the global model on each client's local held-out split."""
    client_test_fraction: float = Field(0.2, gt=0, lt=1)
    plot: bool = True
    """Write metrics.png at the end (matplotlib: about 2-3 s of a short run; false skips it)."""


class TlsConfig(_Section):
    """TLS for a Flower deployment: the CA that signed the SuperLink's certificate (what clients
    verify), and the SuperLink's own certificate and key (what `fedfm flower up` serves)."""

    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.ca is not None


class AuthConfig(_Section):
    """SuperNode authentication for a Flower deployment: only registered node keys may join."""

    enabled: bool = False
    keys_dir: Optional[str] = None
    """Directory with one key pair per SuperNode (`fedfm flower keys` writes it)."""


class RuntimeConfig(_Section):
    name: Literal["inprocess", "flower-sim", "flower"] = "inprocess"
    """inprocess: every client in this process (fast, the default); flower-sim: Flower's simulation
    engine; flower: a Flower deployment (a SuperLink at ``address`` with SuperNodes)."""
    threads: Optional[int] = Field(None, ge=1)
    """torch intra-op threads (None = all cores)."""
    vectorize: Union[bool, Literal["auto"]] = False
    """inprocess: train a round's clients together in one batched (vmapped) call instead of one
    after another (fedfm.trainers.vectorized); "auto" does so for small models (<= 2M parameters),
    where per-client kernels cannot keep the cores busy. Falls back to sequential, with a logged
    reason, where it cannot apply (DP-SGD, one client per round, a model vmap rejects)."""
    workers: int = Field(1, ge=1)
    """inprocess: train clients in this many forked worker processes (1 = in this process). The
    frozen base model is shared between them (shared memory), never copied per process; each
    worker runs one torch thread (a forked child with more threads hangs once its parent has used
    several). See docs/performance.md for when workers beat one process."""
    client_state_mb: Optional[float] = Field(None, gt=0)
    """inprocess: RAM budget (MiB) for the clients' own state (error-feedback residuals); states
    beyond it spill to disk, least recently used first (None = keep all in RAM)."""
    address: str = "127.0.0.1:9093"
    """flower: the SuperLink's Control API address (host:port) that runs are submitted to."""
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    round_timeout: float = Field(600.0, gt=0)
    """flower, flower-sim: seconds a round waits for replies; clients that miss it are left out."""
    min_clients: Optional[int] = Field(None, ge=1)
    """flower, flower-sim: SuperNodes that must be connected before a round starts (default: the
    cohort size), waited for at most ``round_timeout`` seconds."""

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> "RuntimeConfig":
        if self.auth.enabled and (self.tls.ca is None or self.auth.keys_dir is None):
            raise ValueError("runtime.auth.enabled needs runtime.tls.ca (Flower authenticates SuperNodes only "
                             "over TLS) and runtime.auth.keys_dir (the SuperNodes' public keys to register)")
        if self.workers > 1 and self.name != "inprocess":
            raise ValueError(f"runtime.workers = {self.workers} needs runtime.name = 'inprocess' (got {self.name!r}): "
                             "Flower places clients on its own nodes")
        if self.workers > 1 and self.vectorize is True:
            raise ValueError("runtime.workers > 1 and runtime.vectorize = true are alternatives: vectorising "
                             "batches a cohort in one process, workers spread it over processes; pick one")
        if self.vectorize is True and self.name != "inprocess":
            raise ValueError(f"runtime.vectorize = true needs runtime.name = 'inprocess' (got {self.name!r}): "
                             "on Flower every client trains on its own node")
        return self


class CheckpointConfig(_Section):
    every: int = Field(1, ge=1)
    """Save the server state every this many rounds (and after the last)."""


class PrivacyConfig(_Section):
    """Differential privacy of the clients' updates (user-level: one client's whole data).

    central: DP-FedAvg (McMahan et al. 2018): clients clip to ``clip``, the server takes a uniform
    mean over the fixed denominator clients_per_round and adds Gaussian noise (the aggregator's
    weighting does not apply). local: each client clips and adds noise before sending. dpsgd:
    sample-level DP inside each client (DP-SGD via Opacus: per-example gradients clipped to
    ``clip``, noise z * clip per step). Noise always follows clipping: there is no way to
    configure one without the other.
    """

    mechanism: Literal["none", "central", "local", "dpsgd"] = "none"
    clip: float = Field(1.0, gt=0)
    """L2 clip norm C of a client's update (the starting norm with adaptive_clip)."""
    adaptive_clip: bool = False
    """central only: track a quantile of update norms (Andrew et al. 2021)."""
    target_quantile: float = Field(0.5, ge=0, le=1)
    """adaptive_clip: the fraction of updates meant to fall within the clip norm."""
    clip_lr: float = Field(0.2, ge=0)
    """adaptive_clip: learning rate of the geometric clip update."""
    noise_multiplier: Optional[float] = Field(None, ge=0)
    """z: noise std = z * C (central: divided by clients_per_round). Set this or target_epsilon."""
    target_epsilon: Optional[float] = Field(None, gt=0)
    """Calibrate z once so the planned federated rounds end at this epsilon. Set this or noise_multiplier."""
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"


class AttackConfig(_Section):
    """Simulated adversaries (fedfm.attacks): a fixed, seeded fraction of clients is malicious.
    Fields mirror fedfm.attacks.AttackSpec, which checks them; None = the attack's own default."""

    name: Literal["none", "sign-flip", "scale", "noise", "label-flip", "backdoor", "model-replacement"] = "none"
    fraction: float = Field(0.0, ge=0, le=1)
    scale: Optional[float] = Field(None, gt=0)
    noise_std: float = Field(1.0, gt=0)
    boost: Optional[float] = Field(None, gt=0)
    target_label: Optional[int] = Field(None, ge=0)
    trigger: str = "cf mn bb"
    patch: int = Field(3, ge=1)
    poison_fraction: Optional[float] = Field(None, gt=0, le=1)


class SecureAggConfig(_Section):
    """Secure aggregation (SecAgg, Bonawitz et al. 2017; SecAgg+ with ``neighbours``, Bell et al. 2020):
    the server learns only the (weighted) sum of the cohort's updates."""

    enabled: bool = False
    max_dropout: float = Field(0.3, ge=0, lt=0.5)
    """Fraction of clients that may drop after masking while the sum is still recovered."""
    bits: int = Field(32, ge=16, le=62)
    """Fixed-point ring Z_(2^bits) the masked vectors live in."""
    clip_range: float = Field(1.0, gt=0)
    """Each (weighted) coordinate is clipped to [-clip_range, clip_range] before encoding."""
    neighbours: Optional[int] = Field(None, ge=1)
    """SecAgg+: clients each client masks with (None = all others, classic SecAgg)."""
    dropout: float = Field(0.0, ge=0, lt=0.5)
    """Simulation: fraction of the cohort that drops after masking, to exercise recovery."""


CompressorName = Literal["none", "quantize", "topk", "lowrank"]


class _Codec(_Section):
    """A codec or chain of codecs and its parameters (fedfm.compression.build_compressor)."""

    name: Union[CompressorName, list[CompressorName]] = "none"
    bits: int = Field(8, ge=1)
    """quantize: bits per value (1, 2, 4 or 8)."""
    fraction: float = Field(0.01, gt=0, le=1)
    """topk: share of each tensor's coordinates sent."""
    rank: int = Field(4, ge=1)
    """lowrank: rank of the factors."""

    @field_validator("name", mode="before")
    @classmethod
    def _known_names(cls, value: Any) -> Any:
        allowed = get_args(CompressorName)
        names = value if isinstance(value, list) else [value]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise ValueError(f"unknown compressor {unknown[0]!r}; allowed: {', '.join(allowed)}, or a list of them "
                             "applied in order (e.g. [\"topk\", \"quantize\"])")
        return value

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @property
    def enabled(self) -> bool:
        return any(n != "none" for n in self.names)

    def _check_builds(self, key: str, error_feedback: bool = False) -> None:
        if self.enabled:
            from fedfm.compression import build_compressor

            try:
                build_compressor(self.names, self.bits, self.fraction, self.rank, error_feedback)
            except ValueError as e:
                raise ValueError(f"{key}={self.name!r} cannot be built: {e}") from None


class DownlinkConfig(_Codec):
    """Downlink compression: each client gets a compressed correction of the model it holds
    (fedfm.compression.downlink); the server keeps one replica per client."""

    @model_validator(mode="after")
    def _chain_builds(self) -> "DownlinkConfig":
        self._check_builds("compression.downlink.name")
        return self


class CompressionConfig(_Codec):
    """Uplink compression of client updates; a list is a chain applied in order. The download
    is compressed under [compression.downlink]."""

    error_feedback: bool = True
    """Keep what compression dropped on the client and send it in later rounds (Karimireddy et al. 2019)."""
    downlink: DownlinkConfig = DownlinkConfig()

    @model_validator(mode="after")
    def _chain_builds(self) -> "CompressionConfig":
        self._check_builds("compression.name", self.error_feedback)
        return self


class ExperimentConfig(_Section):
    seed: int = Field(0, ge=0)
    task: Literal["classify", "mlm", "clm"] = "classify"
    """classify: sequence classification; mlm: masked-LM (encoders); clm: causal LM (decoders)."""
    paradigm: Literal["ffm", "central", "fl", "pooled"] = "ffm"
    """ffm: the schedule as configured (plain FL when it has no central phase); central: server
    training on public data only; fl: federated rounds only; pooled: server training on public
    plus all private training data (an upper bound no deployment can have)."""
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    federation: FederationConfig = FederationConfig()
    client: ClientConfig = ClientConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    aggregator: AggregatorConfig = AggregatorConfig()
    attack: AttackConfig = AttackConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secagg: SecureAggConfig = SecureAggConfig()
    compression: CompressionConfig = CompressionConfig()
    clients: ClientsConfig = ClientsConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()

    @model_validator(mode="after")
    def _personalization_fits(self) -> "ExperimentConfig":
        m = self.personalization.method
        fedsa = self.adapter.method == "lora" and self.adapter.aggregation == "fedsa"
        if m == "none" and not fedsa:
            return self
        what = f"personalization.method={m!r}" if m != "none" else "adapter.aggregation='fedsa'"
        if m != "none" and fedsa:
            raise ValueError(f"adapter.aggregation='fedsa' already keeps lora_B personal; combine it with "
                             f"personalization.method='none' (got {m!r})")
        if self.task != "classify":
            raise ValueError(f"{what} evaluates each client's model on its held-out labelled data; task must be "
                             f"'classify' (got {self.task!r})")
        if m in ("fedper", "fedrep") and (self.adapter.method not in ("lora", "full") or not self.adapter.train_head):
            raise ValueError(f"{what} keeps the task head local; it needs a trained head beside a shared body: "
                             "adapter.method 'lora' (with adapter.train_head = true) or 'full'")
        if m == "personal-lora" and self.adapter.method != "lora":
            raise ValueError(f"{what} adds a personal LoRA adapter beside the shared one; adapter.method must be "
                             f"'lora' (got {self.adapter.method!r})")
        if self.schedule.central_steps > 0 or self.paradigm in ("central", "pooled"):
            raise ValueError(f"{what} personalizes federated clients; drop the central phases "
                             "(schedule.central_steps = 0, paradigm 'fl' or 'ffm')")
        if self.privacy.mechanism != "none" or self.secagg.enabled:
            raise ValueError(f"{what} is not combined with privacy mechanisms or secure aggregation here")
        if self.federation.mode == "async" or self.adapter.heterogeneous:
            raise ValueError(f"{what} runs with synchronous rounds and one LoRA rank")
        if m != "none" and self.adapter.method == "lora" and self.adapter.aggregation in ("hetlora", "flexlora", "flora"):
            raise ValueError(f"{what} trains personal parameters beside a shared model; "
                             f"adapter.aggregation={self.adapter.aggregation!r} replaces the shared model's "
                             "aggregation; use naive or ffa")
        if m in ("fedrep", "ditto") and self.federation.deadline is not None and self.federation.stragglers == "partial":
            raise ValueError(f"{what} trains in two phases; a straggler's partial work under a deadline is not "
                             "split between them; use federation.stragglers = \"drop\"")
        if self.runtime.name != "inprocess":
            raise ValueError(f"{what} keeps personal parameters in the simulator's client state; "
                             "runtime.name must be 'inprocess'")
        return self

    @model_validator(mode="after")
    def _system_fits(self) -> "ExperimentConfig":
        from fedfm.system import ClientTier, SystemProfile

        c, f = self.clients, self.federation
        try:
            SystemProfile.build(f.clients, self.seed, c.speed, c.availability, c.step_s, c.bandwidth,
                                [ClientTier(t.share, t.speed, t.rank) for t in c.tiers] if c.tiers else None)
        except FedfmError as e:
            raise ValueError(f"[clients]: {e}") from None
        if f.mode == "async":
            if self.aggregator.name != "mean" or self.secagg.enabled or self.privacy.mechanism == "central":
                raise ValueError("federation.mode=\"async\" aggregates a buffer of staleness-weighted updates "
                                 "(FedBuff); it runs with aggregator.name=\"mean\", without secure aggregation or "
                                 "central DP (local DP and compression are fine)")
            if self.schedule.central_steps > 0 or self.paradigm in ("central", "pooled"):
                raise ValueError("federation.mode=\"async\" runs federated aggregations only; drop the central "
                                 "phases (schedule.central_steps=0, paradigm \"fl\" or \"ffm\")")
            if self.algorithm.name in ("scaffold", "fednova"):
                raise ValueError(f"algorithm.name={self.algorithm.name!r} is defined for synchronous rounds; "
                                 "with federation.mode=\"async\" use fedavg, fedprox, fedavgm or the adaptive ones")
            if self.adapter.method == "lora" and self.adapter.aggregation in ("hetlora", "flexlora", "flora"):
                raise ValueError(f"adapter.aggregation={self.adapter.aggregation!r} combines a round's factors at "
                                 "once; federation.mode=\"async\" averages a buffer of stale deltas instead; use "
                                 "naive or ffa (per-client ranks work, zero-padded)")
        return self

    @model_validator(mode="after")
    def _ranks_fit_clients(self) -> "ExperimentConfig":
        a, n = self.adapter, self.federation.clients
        if isinstance(a.rank, list) and len(a.rank) != n:
            raise ValueError(f"adapter.rank lists {len(a.rank)} ranks but federation.clients={n}; give one rank "
                             "per client, one int for all, or \"tiers\"")
        if a.rank == "tiers":
            missing = [i for i, t in enumerate(self.clients.tiers) if t.rank is None]
            if not self.clients.tiers or missing:
                raise ValueError("adapter.rank=\"tiers\" takes each client's rank from its tier; set clients.tiers "
                                 "with a rank in every tier, e.g. [{share = 0.5, speed = 1.0, rank = 16}, "
                                 "{share = 0.5, speed = 0.25, rank = 4}]")
        if a.method == "lora" and a.aggregation == "flora":
            if self.algorithm.name not in ("fedavg", "fedprox"):
                raise ValueError(f"adapter.aggregation='flora' re-initializes the factors every round, which a server "
                                 f"optimizer's state cannot follow; algorithm.name must be fedavg or fedprox "
                                 f"(got {self.algorithm.name!r})")
            if self.runtime.name != "inprocess":
                raise ValueError("adapter.aggregation='flora' merges into the frozen base model the simulator shares; "
                                 "runtime.name must be 'inprocess'")
        pruning = a.method == "lora" and a.aggregation == "hetlora" and a.self_prune
        if a.heterogeneous or pruning:
            what = "per-client LoRA ranks" if a.heterogeneous else "HetLoRA's self-pruning (adapter.self_prune)"
            if self.algorithm.name in ("scaffold", "fednova"):
                raise ValueError(f"{what} pads a client's update with minus the global tail, which is not a "
                                 f"training step; algorithm.name={self.algorithm.name!r} would read it as one "
                                 "(a control variate, a rescaled update); use fedavg, fedprox or a server optimizer")
            if self.privacy.mechanism == "dpsgd":
                raise ValueError(f"{what} keeps a client's components past its rank at zero, which DP-SGD's "
                                 "per-step noise would not; use privacy.mechanism \"none\", \"local\" or \"central\"")
        if pruning and self.privacy.mechanism == "local":
            raise ValueError("HetLoRA's self-pruning reveals, through the rank a client sends at, whether its "
                             "un-noised tail shrank, which local DP does not account for; set adapter.self_prune = "
                             "false with privacy.mechanism \"local\"")
        if a.method == "lora" and a.aggregation == "flora" and self.runtime.workers > 1:
            raise ValueError("adapter.aggregation='flora' merges into the frozen base weights, which forked workers "
                             "would have to share in memory; use runtime.workers = 1")
        if a.aggregation in ("hetlora", "flexlora", "flora") or a.heterogeneous:
            what = (f"adapter.aggregation={a.aggregation!r}" if a.aggregation in ("hetlora", "flexlora", "flora")
                    else "per-client LoRA ranks")
            if self.aggregator.name != "mean":
                raise ValueError(f"{what} combines the clients' factors itself; aggregator.name must be \"mean\" "
                                 f"(got {self.aggregator.name!r})")
            if self.secagg.enabled or self.privacy.mechanism == "central":
                raise ValueError(f"{what} needs each client's factors at the server (sizes differ per rank, "
                                 "products are not sums); it cannot run under secure aggregation or central DP")
        return self

    @model_validator(mode="after")
    def _aggregator_fits_cohort(self) -> "ExperimentConfig":
        a, n = self.aggregator, self.federation.clients_per_round
        need = {"krum": 2 * a.f + 3, "multi-krum": 2 * a.f + 3, "bulyan": 4 * a.f + 3}.get(a.name)
        if need is not None and n < need:
            raise ValueError(f"aggregator.name={a.name!r} with f={a.f} needs at least {need} clients per round "
                             f"(federation.clients_per_round={n}); lower aggregator.f or raise the cohort")
        if a.name == "multi-krum" and a.select is not None and a.select > n - a.f:
            raise ValueError(f"aggregator.select={a.select} exceeds clients_per_round - f = {n - a.f}")
        if a.name == "trimmed-mean" and int(a.trim * n) * 2 >= n:
            raise ValueError(f"aggregator.trim={a.trim} cuts every one of {n} updates; lower it")
        return self

    @model_validator(mode="after")
    def _roles_fit_schedule(self) -> "ExperimentConfig":
        d, s = self.data, self.schedule
        if self.task != "classify":
            if self.partition.method not in ("iid", "natural"):
                raise ValueError(f"partition.method={self.partition.method!r} splits by label, but task "
                                 f"{self.task!r} has no labels; allowed: iid, natural")
            if self.adapter.method == "head":
                raise ValueError(f"adapter.method='head' trains a classifier head; task {self.task!r} has none "
                                 "(allowed: full, lora, and prompt/ptuning/prefix for clm)")
            if self.task == "mlm" and self.adapter.method in ("prompt", "ptuning", "prefix"):
                raise ValueError(f"adapter.method={self.adapter.method!r} is not available for masked LM in peft; "
                                 "use lora or full, or task clm")
        if self.paradigm == "central" and d.public is None:
            raise ValueError("paradigm='central' trains on public data only, but data.public is not set")
        if self.paradigm in ("central", "pooled") and s.central_steps == 0:
            raise ValueError(f"paradigm={self.paradigm!r} runs central stages; set schedule.central_steps > 0")
        if self.paradigm != "ffm":
            return self
        if d.private is not None and d.name != DataConfig().name and d.private != d.name:
            raise ValueError(f"data.name={d.name!r} and data.private={d.private!r} disagree; set only one")
        if d.public is not None and s.central_steps == 0:
            raise ValueError(
                f"data.public={d.public!r} is set but the schedule has no central phase "
                "(schedule.central_steps=0); set schedule.central_steps > 0 or drop data.public"
            )
        if d.public is None and s.central_steps > 0:
            raise ValueError(
                f"schedule.central_steps={s.central_steps} asks for central phases but no public data is "
                "set; set data.public (a dataset, or \"share\") or schedule.central_steps=0"
            )
        if s.policy != "fixed" and s.central_steps == 0:
            raise ValueError(f"schedule.policy={s.policy!r} switches between phases but there is no central "
                             "phase (schedule.central_steps=0); use policy \"fixed\" for plain FL")
        if s.policy != "fixed" and d.val_fraction == 0:
            raise ValueError(f"schedule.policy={s.policy!r} watches a validation loss; data.val_fraction must be > 0")
        return self


    @model_validator(mode="after")
    def _algorithm_fits(self) -> "ExperimentConfig":
        name, c = self.algorithm.name, self.client
        if name == "scaffold":
            if c.optimizer != "sgd" or c.momentum != 0:
                raise ValueError(f"algorithm.name='scaffold' corrects plain SGD steps (its control variate is the "
                                 f"mean gradient, delta / (K lr)); client.optimizer={c.optimizer!r} with momentum "
                                 f"{c.momentum} is not that; set client.optimizer=\"sgd\" and client.momentum=0")
            if self.runtime.name != "inprocess":
                raise ValueError("algorithm.name='scaffold' sends a control variate with each task, which the Flower "
                                 "runtimes do not carry yet; use runtime.name=\"inprocess\"")
            if self.aggregator.name != "mean":
                raise ValueError("algorithm.name='scaffold' averages the control variates of every accepted update, "
                                 f"which a robust aggregator ({self.aggregator.name!r}) would not protect; use "
                                 "aggregator.name=\"mean\"")
        if name in ("scaffold", "fednova"):
            if self.secagg.enabled:
                raise ValueError(f"algorithm.name={name!r} needs each client's update and step count at the server, "
                                 "which secure aggregation hides; turn secagg off or use fedavg")
            if self.privacy.mechanism != "none":
                raise ValueError(f"algorithm.name={name!r} rescales or reads individual updates at the server, "
                                 f"which privacy.mechanism={self.privacy.mechanism!r} does not account for; "
                                 "allowed: privacy.mechanism=\"none\"")
        return self

    @model_validator(mode="after")
    def _downlink_fits(self) -> "ExperimentConfig":
        if not self.compression.downlink.enabled:
            return self
        what = "compression.downlink"
        if self.runtime.name != "inprocess":
            raise ValueError(f"{what} keeps each client's replica in the simulator and counts the compressed "
                             "download; over Flower the dense state travels; runtime.name must be 'inprocess'")
        a = self.adapter
        if a.heterogeneous or (a.method == "lora" and a.aggregation in ("hetlora", "flexlora", "flora")):
            what_rank = (f"adapter.aggregation={a.aggregation!r}" if a.aggregation in ("hetlora", "flexlora", "flora")
                         else "per-client LoRA ranks")
            raise ValueError(f"{what} corrects the full state a client holds; {what_rank} re-forms what each client "
                             "holds every round (truncated or fresh factors); use naive, ffa or fedsa with one rank")
        if self.federation.mode == "async":
            raise ValueError(f"{what} runs with synchronous rounds (federation.mode = \"sync\")")
        return self

    @model_validator(mode="after")
    def _trust_pipeline_fits(self) -> "ExperimentConfig":
        """Privacy, secure aggregation and compression combinations, refused once here."""
        p, sa, agg = self.privacy, self.secagg, self.aggregator.name
        _check_noise(p)
        if p.mechanism == "dpsgd":
            if self.algorithm.name == "fedprox":
                raise ValueError("privacy.mechanism='dpsgd' clips per-example gradients, but FedProx adds a "
                                 "proximal term whose gradient is not per-example; use another algorithm")
            if self.client.grad_clip is not None or p.adaptive_clip:
                raise ValueError("privacy.mechanism='dpsgd' clips each example's gradient to privacy.clip; "
                                 "drop client.grad_clip and privacy.adaptive_clip")
        if p.mechanism == "central" and agg != "mean":
            raise ValueError(f"privacy.mechanism='central' needs aggregator.name='mean' (got {agg!r}): its "
                             "fixed-denominator mean of clipped updates is what bounds one client's influence "
                             "(the sensitivity the noise is calibrated to)")
        if p.adaptive_clip:
            _check_adaptive_clip(p, sa.enabled, self.federation.clients_per_round)
        if sa.enabled:
            _check_secagg(sa, agg, self.compression, self.federation.clients_per_round)
        return self

    @property
    def private_data(self) -> str:
        return self.data.private or self.data.name

    @property
    def val_fraction(self) -> float:
        if self.data.val_fraction is not None:
            return self.data.val_fraction
        return 0.1 if self.schedule.policy != "fixed" else 0.0


def _check_noise(p: PrivacyConfig) -> None:
    both = "privacy.noise_multiplier and privacy.target_epsilon"
    given = [k for k, v in (("noise_multiplier", p.noise_multiplier), ("target_epsilon", p.target_epsilon))
             if v is not None]
    if p.mechanism == "none":
        if given or p.adaptive_clip:
            keys = ", ".join(f"privacy.{k}" for k in given + (["adaptive_clip"] if p.adaptive_clip else []))
            raise ValueError(f"{keys} set but privacy.mechanism='none': noise only comes after clipping, which "
                             "the central or local mechanism does; set privacy.mechanism to 'central' or 'local'")
        return
    if len(given) != 1:
        what = "both are set" if given else "neither is set"
        raise ValueError(f"privacy.mechanism={p.mechanism!r} needs exactly one of {both} ({what}): "
                         "give the noise directly or the epsilon budget to calibrate it to")


def _check_adaptive_clip(p: PrivacyConfig, secagg: bool, cohort: int) -> None:
    if p.mechanism != "central":
        raise ValueError(f"privacy.adaptive_clip needs privacy.mechanism='central' (got {p.mechanism!r}): "
                         "the clip norm is adapted from the noised count of clipped updates at the server")
    if secagg:
        raise ValueError("privacy.adaptive_clip cannot run with secagg.enabled: the server needs the count of "
                         "clipped updates, which secure aggregation hides; use a fixed privacy.clip")
    z, limit = p.noise_multiplier, cohort / 10
    if z is not None and z > 0 and z >= limit:
        raise ValueError(f"privacy.adaptive_clip spends part of the budget on the clipped-count noise (std "
                         f"clients_per_round / 20 = {cohort / 20:g}), so privacy.noise_multiplier={z} must be "
                         f"below clients_per_round / 10 = {limit:g}; raise the cohort or use a fixed clip")


def _check_secagg(sa: SecureAggConfig, agg: str, comp: CompressionConfig, cohort: int) -> None:
    if agg != "mean":
        raise ValueError(f"secagg.enabled needs aggregator.name='mean' (got {agg!r}): robust aggregators need "
                         "the individual updates, which the server never sees under secure aggregation")
    if comp.enabled:
        raise ValueError(f"secagg.enabled cannot run with compression.name={comp.name!r}: secure aggregation "
                         "sums dense fixed-point vectors; set compression.name='none'")
    if cohort < 2:
        raise ValueError("secagg.enabled needs federation.clients_per_round >= 2: a sum of one update is that update")
    if sa.dropout > sa.max_dropout:
        raise ValueError(f"secagg.dropout={sa.dropout} exceeds secagg.max_dropout={sa.max_dropout}: the sum "
                         "could not be recovered; allowed: 0 <= dropout <= max_dropout")
    if sa.neighbours is not None and sa.neighbours >= cohort:
        raise ValueError(f"secagg.neighbours={sa.neighbours} must be below federation.clients_per_round={cohort} "
                         "(a client masks with at most every other member of the cohort)")
    if ((1 << (sa.bits - 1)) - 1) // cohort < 1:
        raise ValueError(f"secagg.bits={sa.bits} is too small to sum {cohort} clients; increase secagg.bits")


DEFAULT_CONFIG = Path(__file__).resolve().parent / "default.toml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a TOML experiment file (None = the default experiment) and apply ``key=value`` overrides.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key, wrong type or out-of-range value.
    """
    raw = read_toml(Path(path) if path is not None else DEFAULT_CONFIG)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return validate(raw)


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def loads_config(text: str) -> ExperimentConfig:
    """An experiment config from TOML text (as `to_toml` writes it)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"experiment config text is not valid TOML: {e}") from e
    return validate(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value``; the value is read as a TOML literal, else kept as a string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. federation.rounds=3)")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}; allowed keys here: {', '.join(_allowed_keys(item['loc']))}")
            continue
        msg = item["msg"].removeprefix("Value error, ")
        if isinstance(item["input"], dict):  # a rule across keys: the message names them
            lines.append(msg if not item["loc"] else f"[{key}] {msg}")
        else:
            lines.append(f"{key} = {item['input']!r} is not allowed: {msg}")
    return "invalid config: " + "; ".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        ann = model.model_fields[str(part)].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        model = ann
    return sorted(model.model_fields)


def to_toml(cfg: ExperimentConfig) -> str:
    """The fully resolved config as TOML (None values are omitted: TOML has no null)."""
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg.model_dump(mode="json")))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_drop_none(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None}
