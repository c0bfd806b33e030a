"""fedfm's Runtime on a Flower Grid: tasks go out as Flower Messages, results come back.

The round logic (cohort, aggregation, server update) stays in fedfm's server loop, which runs
inside the ServerApp; this class only moves messages. A client id is a partition id, and each
SuperNode holds one partition (its node config says which), so the server first asks every
node which partition it holds and then addresses each task to that node. Nodes that are
missing, die mid-round or miss ``round_timeout`` become failed results: the round goes on
without them, and a node that comes back is found again by the next round's lookup.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from flwr.app import Message

from fedfm import wire
from fedfm.errors import FedfmError
from fedfm.runtime.client import result_from_wire
from fedfm.runtime.flower import codec
from fedfm.types import ClientResult, ClientTask

log = logging.getLogger("fedfm.flower")


@dataclass
class GridRuntime:
    """Runtime over a Flower ``Grid`` (simulation or deployment alike).

    Attributes:
        grid: the Grid the ServerApp was given.
        round_timeout: seconds to wait for replies (and for identity answers).
        min_clients: SuperNodes that must be connected before a round is sent.
        poll_s: how often to re-check connected nodes while waiting for ``min_clients``.
    """

    grid: Any
    round_timeout: float
    min_clients: int
    poll_s: float = 1.0
    nodes: dict[int, int] = field(default_factory=dict)  # partition id -> node id

    def run(
        self, tasks: Sequence[ClientTask],
        on_result: "Optional[Callable[[ClientResult], Optional[ClientResult]]]" = None,
    ) -> list[ClientResult]:
        self._wait_for_nodes()
        down: dict[int, bytes] = {}
        messages, sent = [], {}
        results: dict[int, ClientResult] = {}
        for task in tasks:
            node = self.nodes.get(task.client_id)
            if node is None:
                results[task.client_id] = _failed(task.client_id, f"no SuperNode holds partition {task.client_id}")
                continue
            if id(task.params) not in down:  # the broadcast is encoded once per round, not once per task
                down[id(task.params)] = wire.encode(task.params)
            blob = down[id(task.params)]
            content = codec.encode_task(task, blob)
            messages.append(Message(content=content, dst_node_id=node, message_type=codec.TRAIN,
                                    group_id=str(task.round)))
            sent[node] = task.client_id
        replies = list(self.grid.send_and_receive(messages, timeout=self.round_timeout))
        # Pushing sets each message's id. An error reply (e.g. a dead node) comes from the SuperLink,
        # not from the node, so replies are matched to tasks by the id they answer.
        by_id = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        for reply in replies:
            node = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            cid = sent.get(node)
            if cid is None:
                continue
            results[cid] = self._decode(cid, reply)
            if reply.has_error():
                self.nodes.pop(cid, None)  # look it up again next round (it may rejoin as a new node)
        for node, cid in sent.items():
            if cid not in results:
                self.nodes.pop(cid, None)  # look it up again next round (it may rejoin as a new node)
                results[cid] = _failed(cid, f"no reply from SuperNode {node} within {self.round_timeout:g} s")
        ordered = [results[t.client_id] for t in tasks]
        for i, r in enumerate(ordered):
            if r.error:
                log.warning("client %d left out of round %d: %s", r.client_id, tasks[0].round, r.error)
            if on_result is not None:
                returned = on_result(r)
                ordered[i] = returned if isinstance(returned, ClientResult) else r
        return ordered

    def _decode(self, cid: int, reply: Message) -> ClientResult:
        if reply.has_error():
            return _failed(cid, f"client error: {reply.error.reason}")
        wr = codec.decode_result(reply.content)
        if wr.error is not None or wr.up is None:
            return _failed(cid, f"client error: {wr.error}")
        if wr.client_id != cid:
            return _failed(cid, f"reply names partition {wr.client_id}, expected {cid}")
        return result_from_wire(cid, wr.up, wr.metrics, wr.bytes_down)

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + self.round_timeout
        while True:
            self._identify()
            if len(self.nodes) >= self.min_clients:
                return
            if time.monotonic() >= deadline:
                raise FedfmError(
                    f"only {len(self.nodes)} SuperNode(s) with a partition connected within "
                    f"{self.round_timeout:g} s (runtime.round_timeout); need runtime.min_clients={self.min_clients}. "
                    "Start more SuperNodes or lower runtime.min_clients")
            time.sleep(self.poll_s)

    def _identify(self) -> None:
        """Ask every connected node not yet known which partition it holds."""
        connected = set(self.grid.get_node_ids())
        self.nodes = {p: n for p, n in self.nodes.items() if n in connected}
        unknown = connected - set(self.nodes.values())
        if not unknown:
            return
        asks = [Message(content=codec.identify_request(), dst_node_id=n, message_type=codec.IDENTIFY)
                for n in sorted(unknown)]
        for reply in self.grid.send_and_receive(asks, timeout=self.round_timeout):
            if reply.has_error():
                log.warning("SuperNode %d did not identify: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            pid = codec.decode_identity(reply.content)
            if pid in self.nodes and self.nodes[pid] != reply.metadata.src_node_id:
                log.warning("partition %d is held by SuperNodes %d and %d; using the newer",
                            pid, self.nodes[pid], reply.metadata.src_node_id)
            self.nodes[pid] = reply.metadata.src_node_id


def _failed(cid: int, error: str) -> ClientResult:
    return ClientResult(client_id=cid, update=None, metrics={}, bytes_up=0, bytes_down=0, error=error)
