"""The engine: the models, runtimes, batcher, fine-tuning and every piece of the server's state.

It runs as the whole server of one process (``vision-serve`` with ``--frontends 1``), or as its own
process behind protocol front ends (``--frontends`` of 2 or more: ``python -m service.engine``, with
``server``'s ``VisionServer`` listening on Unix sockets and ``hop_server`` the hop's engine end).
Only this process imports torch and the runtimes; front ends import nothing of this package
(``tests/test_layers.py``).
"""
