"""What every process tells about its work besides its answers: ``logs`` the log's formats, a
request's ids on its lines and the access log; ``tracing`` OpenTelemetry spans of requests and
batches, recorded and encoded to OTLP by ``otlp`` and sent by ``otlp_exporters`` (with ``--trace``
only). Torch-free. The Prometheus metrics and Triton's statistics are the engine's
(``service.engine.metrics``, ``service.engine.statistics``).
"""
