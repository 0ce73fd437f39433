"""What tests and ``bench/`` share and the server never ships: real server processes and a real
S3-compatible server on loopback (``servers.py``)."""
