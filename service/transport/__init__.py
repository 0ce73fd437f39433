"""gRPC transport: thin servicers that validate, convert, call the core and convert back."""
