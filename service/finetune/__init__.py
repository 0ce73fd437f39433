"""Fine-tuning: new heads on frozen backbones, trained from labelled images and served at once.

- ``spec``: the validated job configuration.
- ``heads``: the head modules (our own code only; nothing client-sent is executed).
- ``trainer``: trains a head on extracted features (pure torch, no I/O).
- ``store``: the on-disk model store (safetensors + JSON manifest, atomic writes).
- ``jobs``: the job queue, feature extraction through the batched path, events.
- ``sync``: keeps the served models in step with the store (polling).
"""
