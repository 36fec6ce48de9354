"""Two fixes to Flower 1.41's simulation engine, for populations of 10,000-100,000 clients.

Flower's engine moves queued messages to its workers with a loop that, every 0.1 s, asks the
link state for a message *for every registered node* (``vce_api.add_messages_to_queue``);
each ask scans every queued message. With N virtual clients and M messages in flight that is
N x M checks per tick: at 10,000 clients and 100 sampled per round it keeps one of two cores
busy in the driver process, and the clients' own work gets half the machine
(``pfl bench population`` measured the drop from 1,000 to 5,000 clients before this fix).

:func:`patch_simulation_engine` swaps in a loop that first collects the nodes that *have* an
undelivered message (one pass over the queued messages, under the state's lock) and asks only
for those: the same ``get_message_ins`` calls for nodes with work, none for the others, so
what is delivered, and when, does not change. It applies only to flwr 1.41's in-memory link
state (the simulation's); with anything else Flower's own loop runs.

Listing the online nodes (``InMemoryLinkState.get_nodes``, which a strategy calls to sample
every round) walks every node's protobuf record twice, under the state's lock: 10 ms at
10,000 nodes, 160 ms at 100,000, several times a round, while the engine's delivery loop
waits for the lock. :func:`cached_get_nodes` computes the set once per change of the node
table (a node created, deleted, activated, deactivated or heard from) and reuses it until
the first online node's lease would run out (when Flower would tag it offline), so the
answer is the one Flower's own code gives at that moment.
"""

from __future__ import annotations

import functools
import logging
import math
from queue import Queue

log = logging.getLogger("flwr.pfl.simulate")

_ORIGINAL = None


def add_messages_to_queue_of_pending_nodes(state, queue: Queue, nodes_mapping, f_stop) -> None:
    """Flower's ``add_messages_to_queue``, asking only nodes with an undelivered message."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if store is None or lock is None:  # not the in-memory link state: Flower's own loop
        return _ORIGINAL(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        with lock:
            pending = {m.metadata.dst_node_id for m in store.values()
                       if m.metadata.delivered_at == ""}
        for node_id in pending:
            if node_id in nodes_mapping:
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
        f_stop.wait(0.1)


#: InMemoryLinkState's methods that change which nodes are online.
NODE_TABLE_CHANGES = ("create_node", "delete_node", "activate_node", "deactivate_node",
                      "acknowledge_node_heartbeat")
_VERSION, _CACHE = "_pfl_node_table_version", "_pfl_online_nodes"
#: Flower's own ``InMemoryLinkState.get_nodes``, kept when :func:`patch_simulation_engine`
#: replaces it (what the cached listing is checked against).
FLOWER_GET_NODES = None


def _counts_changes(method):
    """``method`` (one of :data:`NODE_TABLE_CHANGES`), counting the node table's changes."""
    @functools.wraps(method)
    def changing(self, *args, **kwargs):
        with self.lock:
            try:
                return method(self, *args, **kwargs)
            finally:
                vars(self)[_VERSION] = vars(self).get(_VERSION, 0) + 1
    changing._pfl_counts_changes = True
    return changing


def cached_get_nodes(self, run_id: int) -> set[int]:
    """``InMemoryLinkState.get_nodes``: the online nodes of the run's federation, listed
    again only when the node table changed or a node's online lease ran out."""
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.date import now

    with self.lock:
        if run_id not in self.run_ids:
            return set()
        version, cached = vars(self).get(_VERSION, 0), vars(self).get(_CACHE)
        if cached is None or cached[0] != version or now().timestamp() >= cached[1]:
            online = self.get_node_info(statuses=[NodeStatus.ONLINE])  # tags lapsed ones
            expires = min((node.online_until for node in online), default=math.inf)
            cached = (version, expires, frozenset(node.node_id for node in online))
            vars(self)[_CACHE] = cached
        federation_id = self.run_ids[run_id].run.federation_id
        return self.federation_manager.filter_nodes(set(cached[2]), federation_id)


def patch_simulation_engine() -> bool:
    """Install both fixes above in Flower's engine (idempotent); True when installed."""
    global _ORIGINAL, FLOWER_GET_NODES
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not getattr(flwr, "__version__", "").startswith("1.41"):
        log.info("flwr %s: leaving its simulation engine as it is", flwr.__version__)
        return False
    if vce_api.add_messages_to_queue is not add_messages_to_queue_of_pending_nodes:
        _ORIGINAL = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue_of_pending_nodes
    for name in NODE_TABLE_CHANGES:
        method = getattr(InMemoryLinkState, name)
        if not getattr(method, "_pfl_counts_changes", False):
            setattr(InMemoryLinkState, name, _counts_changes(method))
    if InMemoryLinkState.get_nodes is not cached_get_nodes:
        FLOWER_GET_NODES = InMemoryLinkState.get_nodes
    InMemoryLinkState.get_nodes = cached_get_nodes
    return True
