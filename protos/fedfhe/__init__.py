"""Generated protobuf/gRPC code for the fedfhe.v1 API (see protos/fedfhe/v1/*.proto)."""
