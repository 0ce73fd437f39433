"""Fine-tuning: new heads on frozen backbones, trained from labelled images and served at once.

- ``names``: the one pattern of model names, and the names that are reserved.
- ``spec``: the validated job configuration (every number checked, head size bounded).
- ``heads``: the head modules (our own code only; nothing client-sent is executed).
- ``trainer``: trains a head on extracted features (pure torch, no I/O); ``TrainMetrics``.
- ``examples``: collecting a job's examples within its limits, checking its images.
- ``job``: job state, events.
- ``manager``: caps, the queue (one job per device), events, cancellation, finished jobs.
- ``pipeline``: extract features -> train -> publish.
- ``history``: bounded records of finished jobs, kept in the store.
- ``store`` and ``files``: the on-disk model store (safetensors + JSON manifest), bounded reads.
- ``sync``: keeps the served models in step with the store (polling), skipping bad entries.
"""
