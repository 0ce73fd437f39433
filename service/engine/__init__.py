"""The engine process behind protocol front ends (``--frontends`` of 2 or more): the models,
runtimes, batcher, fine-tuning and every piece of the server's state (``service.engine.server``'s
``VisionServer`` with its listeners on Unix sockets), and the hop's engine end."""
