"""Reconstruction losses of the official recipe: L2, LPIPS (AlexNet), identity (ArcFace IR-SE-50) or MoCo similarity.

Every loss compares the (pooled) generator output with the target at the loss size, both in [-1, 1]. The frozen
networks behind LPIPS / identity / MoCo are pretrained; their weights come through the weights registry or the
models folder (`hyperstyle_nodes.loaders.downloads.resolve`), never from an implicit download. A loss whose weights cannot
be found is an error that says where to put them, or to set its lambda to 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..engines.hyperstyle.encoders import EncoderConfig, IRSEBackbone
from ..engines.hyperstyle.model import HYPERNET_INPUT_SIZE, pool_to

# Pretrained weights: (file name in the models folder, registry name, what it is, where it comes from).
LOSS_WEIGHTS = {
    "lpips": ("alexnet-owt-7be5be79.pth", "alexnet_imagenet",
              "the ImageNet AlexNet that LPIPS measures with (torchvision's alexnet-owt-7be5be79.pth)",
              "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "id": ("model_ir_se50.pth", "arcface_ir_se50",
           "the ArcFace IR-SE-50 face recognition network (model_ir_se50.pth, TreB1eN/InsightFace_Pytorch)",
           "the pretrained models listed in github.com/yuval-alaluf/hyperstyle (\"IR-SE50 Model\")"),
    "moco": ("moco_v2_800ep_pretrain.pt", "moco_v2_800ep",
             "the MoCo-v2 ResNet-50 (moco_v2_800ep_pretrain.pt, facebookresearch/moco)",
             "the pretrained models listed in github.com/yuval-alaluf/hyperstyle (\"MoCo ResNet-50\")"),
}
LAMBDA_FLAGS = {"lpips": "--lpips-lambda", "id": "--id-lambda", "moco": "--moco-lambda"}
WEIGHT_FLAGS = {"lpips": "--lpips-weights", "id": "--id-weights", "moco": "--moco-weights"}


class LossWeightsError(RuntimeError):
    """A loss cannot be set up (its pretrained weights are missing, or the lambdas conflict); the message says what
    to do, e.g. how to get the weights or to set the loss's lambda to 0."""


def resolve_loss_weights(loss: str, given: Optional[str] = None) -> Path:
    """The local file for a loss's pretrained network: the given path/name, else the file name in the models
    folder, else the registry name (which may download it), else torch hub's cache."""
    from ..loaders import downloads

    file_name, registry_name, what, source = LOSS_WEIGHTS[loss]
    candidates = [given] if given else [file_name, registry_name]
    reasons = []
    for candidate in candidates:
        try:
            return downloads.resolve(candidate, progress=True)
        except downloads.WeightsError as err:
            reasons.append(str(err))
    if not given:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        if cached.is_file():
            return cached
    try:
        folder = downloads.models_dir()
    except Exception:  # pragma: no cover - no writable models folder
        folder = "the models folder"
    raise LossWeightsError(
        f"The {loss} loss ({LAMBDA_FLAGS[loss]}) needs {what}, which was not found"
        f"{' at ' + repr(given) if given else ''}. Get {file_name} from {source} and put it in {folder} (or pass "
        f"{WEIGHT_FLAGS[loss]} PATH), or set {LAMBDA_FLAGS[loss]} 0 to train without this loss.\n"
        f"({reasons[0]})")


def _load_state(path: Path) -> dict:
    from ..loaders.checkpoints import torch_load_safely

    state = torch_load_safely(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------------------------------------------------------
# LPIPS


def build_lpips(weights: Optional[str] = None) -> nn.Module:
    """lpips.LPIPS(net='alex') with its calibrated linear layers (shipped in the package) and the ImageNet AlexNet
    trunk loaded from our weights, instead of the package's download."""
    try:
        import lpips
    except ImportError as err:
        raise LossWeightsError("the LPIPS loss needs the `lpips` package: pip install lpips (or pip install "
                               "'hyperstyle-nodes[train]'), or set --lpips-lambda 0") from err
    path = resolve_loss_weights("lpips", weights)
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    features = {k[len("features."):]: v for k, v in _load_state(path).items() if k.startswith("features.")}
    # lpips keeps torchvision's layer indices inside its slices: net.slice2.3.weight is features.3.weight
    trunk = {}
    for name, _ in net.net.named_parameters():
        _, index, param = name.split(".")
        if f"{index}.{param}" not in features:
            raise LossWeightsError(f"{path} is not torchvision's AlexNet (no features.{index}.{param}); the LPIPS "
                                   "loss needs alexnet-owt-7be5be79.pth, or set --lpips-lambda 0")
        trunk[name] = features[f"{index}.{param}"]
    net.net.load_state_dict(trunk, strict=True)
    return _freeze(net)


class LPIPSLoss(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, y_hat, y):
        return self.net(y_hat, y).mean()


# ---------------------------------------------------------------------------------------------------------------
# Identity (faces) and MoCo similarity (other domains): 1 - cosine similarity of embeddings, target detached


class ArcFace(IRSEBackbone):
    """ArcFace IR-SE-50 at 112 px: the engine's IR-SE-50 trunk plus the embedding head (`output_layer.*`)."""

    def __init__(self):
        super().__init__(EncoderConfig(kind="w_encoder", n_styles=1))
        self.output_layer = nn.Sequential(nn.BatchNorm2d(512), nn.Dropout(0.6), nn.Flatten(),
                                          nn.Linear(512 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x):
        return F.normalize(self.output_layer(self.body(self.input_layer(x))), dim=1)


def build_arcface(weights: Optional[str] = None) -> nn.Module:
    path = resolve_loss_weights("id", weights)
    net = ArcFace()
    try:
        net.load_state_dict(_load_state(path), strict=True)
    except RuntimeError as err:
        raise LossWeightsError(f"{path} is not the ArcFace IR-SE-50 (model_ir_se50.pth): {err}") from err
    return _freeze(net)


class EmbeddingLoss(nn.Module):
    """1 - cosine similarity of the embeddings of output and target (the target's without gradient)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def embed(self, x):
        raise NotImplementedError

    def forward(self, y_hat, y):
        return (1 - (self.embed(y_hat) * self.embed(y).detach()).sum(1)).mean()


class IdentityLoss(EmbeddingLoss):
    """The official IDLoss: crop the face's inner region of a 256-px image, pool to 112, compare embeddings."""

    def embed(self, x):
        if x.shape[-1] != HYPERNET_INPUT_SIZE:
            x = F.interpolate(x, size=(HYPERNET_INPUT_SIZE,) * 2, mode="bilinear", align_corners=False)
        return self.net(F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112)))


def build_moco(weights: Optional[str] = None) -> nn.Module:
    """torchvision ResNet-50 with MoCo-v2's query encoder, up to the global pool (2048-d features)."""
    import torchvision

    path = resolve_loss_weights("moco", weights)
    prefix = "module.encoder_q."
    state = {k[len(prefix):]: v for k, v in _load_state(path).items()
             if k.startswith(prefix) and not k.startswith(prefix + "fc")}
    net = torchvision.models.resnet50(weights=None)
    result = net.load_state_dict(state, strict=False)
    if set(result.missing_keys) != {"fc.weight", "fc.bias"} or result.unexpected_keys:
        raise LossWeightsError(f"{path} is not a MoCo-v2 ResNet-50 checkpoint (module.encoder_q.* weights); the MoCo "
                               "loss needs moco_v2_800ep_pretrain.pt, or set --moco-lambda 0")
    net.fc = nn.Identity()
    return _freeze(net)


class MocoLoss(EmbeddingLoss):
    """The official MocoLoss: resize to 224 (nearest, inputs in [-1, 1] as the official code feeds them)."""

    def embed(self, x):
        return F.normalize(self.net(F.interpolate(x, size=224)), dim=1)


# ---------------------------------------------------------------------------------------------------------------


class ReconstructionLoss(nn.Module):
    """lambda-weighted sum of the losses whose lambda is > 0. forward -> (loss tensor, {name: float})."""

    def __init__(self, l2_lambda=1.0, lpips_lambda=0.0, id_lambda=0.0, moco_lambda=0.0, weights: Optional[dict] = None):
        super().__init__()
        if id_lambda > 0 and moco_lambda > 0:
            raise LossWeightsError("--id-lambda and --moco-lambda are both > 0: use the identity loss for faces or the MoCo "
                             "similarity for other domains, not both (as in the official recipe)")
        weights = weights or {}
        self.lambdas = {"l2": l2_lambda, "lpips": lpips_lambda, "id": id_lambda, "moco": moco_lambda}
        self.lpips = LPIPSLoss(build_lpips(weights.get("lpips"))) if lpips_lambda > 0 else None
        self.id = IdentityLoss(build_arcface(weights.get("id"))) if id_lambda > 0 else None
        self.moco = MocoLoss(build_moco(weights.get("moco"))) if moco_lambda > 0 else None
        if not any(v > 0 for v in self.lambdas.values()):
            raise LossWeightsError("every loss lambda is 0: nothing to train for; set at least --l2-lambda > 0")

    def train(self, mode: bool = True):
        return super().train(False)  # the pretrained networks always run in eval mode (BatchNorm, dropout)

    def forward(self, y_hat: torch.Tensor, y: torch.Tensor):
        y_hat, y = y_hat.float(), y.float()
        if y_hat.shape[-1] != y.shape[-1]:
            y_hat = pool_to(y_hat, y.shape[-1])
        terms = {}
        with torch.autocast(y.device.type, enabled=False):
            terms["l2"] = F.mse_loss(y_hat, y)  # always reported: the held-out L2 is the headline number
            for name in ("lpips", "id", "moco"):
                module = getattr(self, name)
                if module is not None:
                    terms[name] = module(y_hat, y)
        total = sum(self.lambdas[name] * value for name, value in terms.items() if self.lambdas[name] > 0)
        return total, {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
