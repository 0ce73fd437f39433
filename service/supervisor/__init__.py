"""``vision-serve`` with ``--frontends`` of 2 or more: the parent process (``supervisor``) that starts the
engine and the protocol front ends as fresh interpreters, restarts them, and drains them in order.
Torch-free, as the front ends are.
"""
