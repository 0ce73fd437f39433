"""Where a model's weights come from: pretrained, seeded random, or a directory."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from service.errors import WeightsUnavailableError
from service.host.files import MAX_NETWORK_FILE_BYTES, FileRefused, open_regular
from service.models.registry import ModelSpec

log = logging.getLogger(__name__)

RANDOM_SEED = 0


@dataclass(frozen=True)
class WeightsSource:
    """Parsed ``--weights``: ``pretrained``, ``random`` or a directory of state dicts."""

    kind: str  # "pretrained" | "random" | "directory"
    directory: Path | None = None

    @classmethod
    def parse(cls, value: str) -> WeightsSource:
        if value in ("pretrained", "random"):
            return cls(kind=value)
        path = Path(value).expanduser()
        if not path.is_dir():
            raise WeightsUnavailableError(
                f"--weights {value!r} is neither 'pretrained', 'random' nor an existing directory "
                "of <model>.pth state dicts"
            )
        return cls(kind="directory", directory=path)

    def describe(self) -> str:
        return str(self.directory) if self.kind == "directory" else self.kind


def build_model(spec: ModelSpec, source: WeightsSource) -> torch.nn.Module:
    """Build ``spec``'s network on the CPU with weights from ``source``, in eval mode."""
    if source.kind == "pretrained":
        model = _pretrained(spec, progress=False)
    elif source.kind == "random":
        log.warning(
            "MODEL %s USES RANDOM WEIGHTS (seeded): its predictions are meaningless. "
            "Use --weights pretrained or a directory of state dicts for real results.",
            spec.name,
        )
        model = _seeded_random(spec)
    else:
        assert source.directory is not None
        model = _from_directory(spec, source.directory)
    return model.eval()


def fetch_pretrained(spec: ModelSpec) -> Path:
    """Download ``spec``'s pretrained weights into torch's cache, with a progress bar."""
    _pretrained(spec, progress=True)
    return cached_weights(spec)


def cached_weights(spec: ModelSpec) -> Path:
    """Where torch's cache keeps ``spec``'s pretrained weights (``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.weights.url).name


def ensure_pretrained(specs: Sequence[ModelSpec], *, progress: bool = False) -> None:
    """Every one of ``specs``' pretrained weights in torch's cache, before any model is built.

    What is cached already is not touched; what is missing is downloaded. When a download fails,
    one error names every model still missing (not only the first), with the one command that
    pre-seeds all of them: a user who follows it is not sent back for the next model. No other
    download is tried after one failed (offline, each would only fail the same way, slowly).
    """
    missing = [spec for spec in specs if not cached_weights(spec).is_file()]
    for index, spec in enumerate(missing):
        path = cached_weights(spec)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(path.name)
            torch.hub.download_url_to_file(
                spec.weights.url, str(path), match.group(1) if match else None, progress=progress
            )
        except Exception as exc:  # urllib, SSL, hash and IO errors all mean the same to a user
            raise WeightsUnavailableError(_missing_message(missing[index:], exc)) from exc


def _missing_message(missing: Sequence[ModelSpec], exc: Exception) -> str:
    names = [spec.name for spec in missing]
    files = ", ".join(cached_weights(spec).name for spec in missing)
    cache = cached_weights(missing[0]).parent
    return (
        f"cannot get pretrained weights for {', '.join(names)} ({type(exc).__name__}: {exc}). "
        f"Pre-seed the cache by running `vision-serve fetch-weights --models {','.join(names)}` on a "
        f"machine with internet access and copying {'its file' if len(missing) == 1 else 'its files'} "
        f"{files} from its {cache.name} folder into {cache} here (the cache follows TORCH_HOME, now "
        f"{os.environ.get('TORCH_HOME', 'unset')}), or start with --weights DIR (a directory of "
        "<model>.pth state dicts) or --weights random."
    )


def _pretrained(spec: ModelSpec, *, progress: bool) -> torch.nn.Module:
    ensure_pretrained([spec], progress=progress)
    path = cached_weights(spec)
    try:
        state = spec.weights.get_state_dict(progress=progress, check_hash=True)
        return _with_state(spec, state)
    except Exception as exc:  # a cached file that is cut short, corrupt, or not this network's
        raise WeightsUnavailableError(
            f"cannot load the pretrained weights of {spec.name} from {path} ({type(exc).__name__}: {exc}); "
            f"delete the file and run `vision-serve fetch-weights --models {spec.name}` again, "
            "or start with --weights DIR (a directory of <model>.pth state dicts) or --weights random."
        ) from exc


def _seeded_random(spec: ModelSpec) -> torch.nn.Module:
    """The same name always gives the same weights, so that tests and replicas agree.

    Every weight is drawn again from a generator of its own rather than torch's global one,
    which other threads (fine-tuning, another model loading) may draw from at the same time.
    The rule is VGG's and ResNet's own initialization (He for convolutions, N(0, 0.01) for
    linear layers, zero biases, unit batch norms), then :func:`_calibrate` on seeded synthetic
    images, without which the networks answer nothing useful: ResNet101's logits reach 1e5
    (its unit batch norms let every residual block grow the signal), VGG16's shrink to 0.1, and
    both give every image the same top class. Costs one forward pass of a few images at start-up.
    """
    generator = torch.Generator().manual_seed(RANDOM_SEED + zlib.crc32(spec.name.encode()))
    model = _unset(spec).to_empty(device="cpu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, 0.0, 0.01, generator=generator)
            elif isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
                module.reset_running_stats()
            elif (
                next(module.parameters(recurse=False), None) is not None
                or next(module.buffers(recurse=False), None) is not None
            ):
                raise TypeError(f"{spec.name}: no seeded initialization for {type(module).__name__}")
            else:
                continue
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    _calibrate(model, spec, generator)
    return model


CALIBRATION_IMAGES = 6  # synthetic images of one forward pass at start-up (VGG16: about 2 s more on 2 cores)
LOGIT_STD = 3.0  # spread of the calibrated logits: top scores of about 10, softmax neither flat nor one-hot


def _calibrate(model: torch.nn.Module, spec: ModelSpec, generator: torch.Generator) -> None:
    """Data-dependent initialization (after LSUV, Mishkin and Matas 2016) in one forward pass of
    :data:`CALIBRATION_IMAGES` seeded synthetic images: each convolution and linear layer is
    divided by one number so that its output has unit spread, and the last layer loses the
    direction all features share (post-ReLU features are all positive: that direction would pick
    one top class for every image) and is centred per class and spread to :data:`LOGIT_STD`.

    Only scales change (and the last layer, and batch norms' running statistics, which the pass
    moves a tenth of the way to the calibration batch's, as one training step would), so the
    features a fine-tuned head learns from are torchvision's random network's, at a sane size.
    Dropout is off during the pass. The scales are rounded to 3 significant digits, so that
    machines whose thread counts sum in another order still agree on the weights.
    """
    last = spec.classifier(model)

    def unit_spread(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        if isinstance(
            bias, torch.Tensor
        ):  # centred per channel too, where the layer has a bias (not before a batch norm)
            channels = output.transpose(0, 1).flatten(1)
            mean = channels.mean(1).to(torch.bfloat16).float()
            bias.sub_(mean)
            output = output - mean.view(1, -1, *([1] * (output.dim() - 2)))
        scale = _rounded(float(output.std()))
        _scale_layer(module, scale)
        return output / scale

    def centred_logits(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        features = inputs[0]
        shared = features.mean(0)
        shared = shared / shared.norm().clamp_min(1e-12)
        weight = module.get_parameter("weight")
        weight.sub_(torch.outer(weight @ shared, shared))
        output = torch.nn.functional.linear(features, weight, module.get_parameter("bias"))
        mean = output.mean(0)
        # The spread a feature vector of the calibration's length would get, not the spread of
        # what is left of the calibration's own: images unlike those differ from them more.
        scale = _rounded(float(weight.std() * features.square().sum(1).mean().sqrt()) / LOGIT_STD)
        _scale_layer(module, scale)
        bias = module.get_parameter("bias")
        bias.sub_((mean / scale).to(torch.bfloat16).float())
        return (output - mean) / scale

    hooks = [
        module.register_forward_hook(centred_logits if module is last else unit_spread)
        for module in model.modules()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    # Batch norms normalize by the calibration batch (and move their running statistics a tenth
    # of the way to it, deterministically); dropout must drop nothing, or the weights would
    # differ from one build to the next.
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    for dropout in dropouts:
        dropout.eval()
    try:
        with torch.no_grad():
            model(_synthetic_images(spec, generator))
    finally:
        for hook in hooks:
            hook.remove()
        for dropout in dropouts:
            dropout.train(model.training)


def _synthetic_images(spec: ModelSpec, generator: torch.Generator) -> torch.Tensor:
    """Seeded stand-ins for what a server is shown, as the model's preprocessing leaves them:
    textures (noise at every scale from blobs to single pixels, whose sum has a photograph's
    falling spectrum, shared in part between the colour channels), smooth shading (the blobs
    only), and near-flat colours, in [0, 1], normalized with the weights' mean and deviation.
    The spread of kinds matters more than their number: statistics taken on textures alone
    leave flat images far outside them, and deep networks multiply the difference."""
    size = spec.crop_size
    kinds = torch.arange(CALIBRATION_IMAGES) % 3  # 0 texture, 1 shading, 2 flat
    pixels = torch.zeros(CALIBRATION_IMAGES, 3, size, size)
    for cells in (2, 4, 8, 16, 32, 64, size):
        coarse = torch.randn(CALIBRATION_IMAGES, 1, cells, cells, generator=generator) + 0.5 * torch.randn(
            CALIBRATION_IMAGES, 3, cells, cells, generator=generator
        )
        layer = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        weight = torch.where(kinds == 0, 1.0, torch.where(kinds == 1, float(cells <= 8), 0.05))
        pixels += weight.view(-1, 1, 1, 1) * layer
    pixels = pixels / pixels.flatten(1).std(1).view(-1, 1, 1, 1)
    pixels = torch.where((kinds == 2).view(-1, 1, 1, 1), 0.1 * pixels, pixels)
    colours = 3.0 * torch.randn(CALIBRATION_IMAGES, 3, 1, 1, generator=generator)
    pixels = torch.sigmoid(pixels + colours)
    transforms = spec.transforms()
    mean = torch.tensor(getattr(transforms, "mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
    std = torch.tensor(getattr(transforms, "std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _scale_layer(module: torch.nn.Module, scale: float) -> None:
    module.get_parameter("weight").div_(scale)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(scale)


def _rounded(value: float) -> float:
    """``value`` to 3 significant digits (never 0: a dead layer keeps its scale)."""
    return float(f"{value:.3g}") if value > 0 else 1.0


def _unset(spec: ModelSpec) -> torch.nn.Module:
    """``spec``'s network with storage-less (meta) tensors: building it this way skips
    torchvision's own random initialization, seconds of CPU for VGG16 that every weights
    source would overwrite at once."""
    with torch.device("meta"):
        return spec.build(pretrained=False)


def _with_state(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``spec``'s network holding ``state``'s tensors (strict: every key, every shape).

    Tensors are taken as they are, not copied, except where their dtype is not the network's
    (a state dict saved in half or double precision), which is converted as a copying load would.
    """
    model = _unset(spec)
    expected = model.state_dict()
    converted = {
        key: value.to(expected[key].dtype)
        if key in expected and isinstance(value, torch.Tensor) and value.dtype != expected[key].dtype
        else value
        for key, value in state.items()
    }
    model.load_state_dict(converted, assign=True)
    return model


def _from_directory(spec: ModelSpec, directory: Path) -> torch.nn.Module:
    path = directory / f"{spec.name}.pth"
    try:
        # Followed if a symlink: weights directories are often mounted volumes of links.
        with open_regular(path, MAX_NETWORK_FILE_BYTES, follow_symlinks=True) as file:
            state = torch.load(file, map_location="cpu", weights_only=True)
        return _with_state(spec, state)
    except FileNotFoundError:
        raise WeightsUnavailableError(f"no weights for {spec.name}: expected the state dict file {path}") from None
    except FileRefused as exc:
        raise WeightsUnavailableError(f"cannot read the weights of {spec.name}: {exc}") from exc
    except Exception as exc:
        raise WeightsUnavailableError(
            f"cannot load {path} as the state dict of torchvision's {spec.name} "
            f"({type(exc).__name__}: {exc}); save it with torch.save(model.state_dict(), path)"
        ) from exc
