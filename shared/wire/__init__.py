"""Generated protobuf and gRPC code for proto/pfl.proto (regenerate: proto/generate.sh).

``pfl_pb2`` holds the messages (Piece, Tensor, GateEntry, Recipe, ...), ``pfl_pb2_grpc`` the
PiecePool service stubs. Do not edit the generated files by hand.
"""

from . import pfl_pb2, pfl_pb2_grpc

__all__ = ["pfl_pb2", "pfl_pb2_grpc"]
