"""What the host gives a process, read and set the same way in every process (supervisor, front ends,
engine): ``cpus`` the CPU cores it may use; ``memory`` the C allocator's settings; ``files`` the one
bounded reader and atomic writer of files; ``ports`` the listening ports, checked and bound. Torch-free
at import (``cpus`` sizes torch's threads only where torch is already in use).
"""
