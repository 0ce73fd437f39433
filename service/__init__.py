"""vision-serving: torchvision classifiers over the Open Inference Protocol (gRPC)."""

from vision_client import __version__ as __version__  # released together: one VERSION file
