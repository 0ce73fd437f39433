"""Protocol front ends (``--frontends`` of 2 or more): processes that serve the public gRPC and
HTTP ports, authorize and parse calls, and hand them to the engine (``service.inference.hop`` for
inference, the engine's gRPC socket for the rest). They load no torch and no runtime."""
