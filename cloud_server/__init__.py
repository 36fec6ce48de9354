"""The cloud side: Flower ServerApp and its phases, aggregation, the piece pool (store and
gRPC service) and the inference service hosting the frozen base model.

Thin over Flower: the methods' math stays in :mod:`shared`."""
