"""A DNS server for tests: answers every A query with the addresses it was given.

gRPC's resolver takes a DNS server in the target's authority (``dns://127.0.0.1:PORT/name:port``),
so a test can give a name several loopback addresses without touching the machine's resolver.
"""

from __future__ import annotations

import socket
import struct
import threading

A, IN = 1, 1


class DnsServer:
    """Answers A queries for any name with ``addresses`` (TTL 5 s); other queries get no answer."""

    def __init__(self, addresses: list[str]) -> None:
        self._addresses = [socket.inet_aton(address) for address in addresses]
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._socket.close()

    def target(self, name: str, port: int) -> str:
        return f"dns://127.0.0.1:{self.port}/{name}:{port}"

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._socket.recvfrom(512)
            except OSError:
                return  # closed
            self._socket.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        (transaction,) = struct.unpack(">H", query[:2])
        end = 12
        while query[end] != 0:  # the question's name: length-prefixed labels up to a zero
            end += query[end] + 1
        qtype, qclass = struct.unpack(">HH", query[end + 1 : end + 5])
        question = query[12 : end + 5]
        records = b""
        if (qtype, qclass) == (A, IN):
            for address in self._addresses:  # a pointer to the question's name, A, IN, TTL, the address
                records += b"\xc0\x0c" + struct.pack(">HHIH", A, IN, 5, 4) + address
        count = len(self._addresses) if records else 0
        header = struct.pack(">HHHHHH", transaction, 0x8180, 1, count, 0, 0)  # a response, no error
        return header + question + records
