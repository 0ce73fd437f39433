"""Model registry (what can be served) and weight loading (how it is built)."""

from service.models import tiny as _tiny  # noqa: F401  (registers the tiny model)
from service.models.registry import ModelSpec, get_model_spec, list_models, register_model
from service.models.weights import WeightsSource, build_model, fetch_pretrained

__all__ = [
    "ModelSpec",
    "WeightsSource",
    "build_model",
    "fetch_pretrained",
    "get_model_spec",
    "list_models",
    "register_model",
]
