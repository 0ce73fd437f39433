"""vision-serving: torchvision classifiers over the Open Inference Protocol (gRPC)."""

__version__ = "0.1.0"
