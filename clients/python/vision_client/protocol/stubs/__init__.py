"""Generated stubs of protos/. Do not edit: run `make protos`."""
