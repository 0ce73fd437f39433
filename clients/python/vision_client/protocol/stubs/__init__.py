"""Generated protobuf and gRPC stubs of protos/. Do not edit: run `make protos`."""
