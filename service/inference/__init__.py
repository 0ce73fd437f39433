"""What an inference is made of and how it crosses between processes, without torch: the protocol
front ends and the engine (or the single process) use these alike.

``inference_io`` an inference's input and result and the one image-count limit; ``preprocess``
decoding images and each model's exact preprocessing (Pillow and numpy); ``classification`` top-k
classes; ``shared_memory`` Triton's system shared memory regions; ``hop`` the descriptors and the
shared-memory arena between a front end and the engine; ``backbone_blocks`` the names of each
backbone's blocks. No module here imports torch (``tests/test_layers.py``).
"""
