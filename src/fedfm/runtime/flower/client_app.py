"""fedfm's client side as a Flower ClientApp.

The app builds the client side once per process (model, adapter, tokenized data, trainer, update
pipeline) from the experiment config in the run config, and then answers two message types:
``query`` (which partition this SuperNode holds, from its node config) and ``train`` (one round's
task, answered with the encoded payload). Training is fedfm's own `train_client`, the function
the in-process runtime calls, so both runtimes compute the same update from the same task. The
client's pipeline state (error-feedback residuals) lives in the node's persistent
``context.state``, as a client keeps it on its own device.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfm.runtime.flower import codec

log = logging.getLogger("fedfm.flower")

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _client_side(config_text: str) -> tuple[Any, Any]:
    """(trainer, update pipeline) of the experiment, built once per process."""
    from fedfm.config import loads_config
    from fedfm.experiment import build_client_side
    from fedfm.pipeline import build_pipeline

    cfg = loads_config(config_text)
    _, _, _, trainer = build_client_side(cfg)
    return trainer, build_pipeline(cfg)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return Message(codec.encode_identity(codec.partition_of(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedfm.runtime.client import train_client

    pid = codec.partition_of(context)
    task, bytes_down = codec.decode_task(msg.content)
    if task.client_id != pid:
        return Message(codec.encode_failure(pid, f"task for partition {task.client_id} reached the SuperNode "
                                                 f"holding partition {pid}"), reply_to=msg)
    try:
        text, _ = codec.run_config_of(context)
        trainer, pipeline = _client_side(text)
        reply = train_client(trainer, task, pipeline, codec.load_client_state(context.state))
        codec.store_client_state(context.state, reply.state)
    except Exception as e:  # the server logs it and the round goes on without this client
        log.exception("training failed on partition %d", pid)
        return Message(codec.encode_failure(pid, f"{type(e).__name__}: {e}"), reply_to=msg)
    if reply.up is None:
        return Message(codec.encode_failure(pid, str(reply.error)), reply_to=msg)
    return Message(codec.encode_result(pid, reply.up, reply.metrics, bytes_down), reply_to=msg)
