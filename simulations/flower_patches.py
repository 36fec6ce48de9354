"""One fix to Flower 1.41's simulation engine, for populations of thousands of clients.

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
"""

from __future__ import annotations

import logging
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


def patch_simulation_engine() -> bool:
    """Install the loop above in Flower's engine (idempotent); True when installed."""
    global _ORIGINAL
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    if not getattr(flwr, "__version__", "").startswith("1.41"):
        log.info("flwr %s: leaving its simulation engine as it is", flwr.__version__)
        return False
    if vce_api.add_messages_to_queue is add_messages_to_queue_of_pending_nodes:
        return True
    _ORIGINAL = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_to_queue_of_pending_nodes
    return True
