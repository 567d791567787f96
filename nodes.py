"""ComfyUI nodes for HyperStyle: thin classes over `hyperstyle_nodes` (the library does the work).

Node ids (the class names in NODE_CLASS_MAPPINGS) are public API: saved workflows refer to them.
"""
from __future__ import annotations

try:  # inside ComfyUI this file is a submodule of the pack's package
    from .hyperstyle_nodes import downloads, editing, ops
    from .hyperstyle_nodes.manager import DEVICE_CHOICES, DTYPE_CHOICES
except ImportError:  # imported as a top-level module (tests, scripts)
    from hyperstyle_nodes import downloads, editing, ops
    from hyperstyle_nodes.manager import DEVICE_CHOICES, DTYPE_CHOICES

CATEGORY = "HyperStyle"
ALIGNED_FACE_TIP = ("Face-aligned photo(s) (use Align Face first). Any size or aspect is resized to 256x256 for the "
                    "encoders; grayscale is used as RGB and an alpha channel is ignored.")


def _comfy_progress(total: int):
    """A per-iteration callback: advances ComfyUI's progress bar and stops if the user cancelled."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except ImportError:  # outside ComfyUI
        return None
    bar = comfy.utils.ProgressBar(total)

    def on_step(done: int, _total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return on_step


def _models(*kinds: str) -> list:
    names = []
    for kind in kinds:
        names += [n for n in downloads.list_local_models(kind) if n not in names]
    return names or ["(no models found)"]


class HyperStyleLoader:
    DESCRIPTION = ("Loads HyperStyle and its initial encoder once and keeps them on the GPU between prompts. "
                   "Registry models download on first use into models/hyperstyle/.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (_models("hyperstyle"), {"tooltip": "HyperStyle checkpoint (hypernetwork + generator), a "
                                                              "registry name or a file in models/hyperstyle/."}),
            "initial_encoder": (_models("w_encoder", "e4e") + ["none"], {
                "tooltip": "Encoder for the initial inversion: faces_w_encoder (W, the official choice) or "
                           "e4e_ffhq_encode (W+, better for edits). The file's contents decide which it is."}),
            "precision": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "auto: fp32 on CPU, half precision "
                                                                             "on GPUs that support it."}),
            "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": "auto: ComfyUI's device."}),
        }}

    RETURN_TYPES = ("HYPERSTYLE_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, checkpoint, initial_encoder, precision, device):
        return (ops.load_model(checkpoint, initial_encoder, precision, device),)


class HyperStyleEncode:
    DESCRIPTION = "Initial inversion with the model's encoder: aligned face -> latent codes and their reconstruction."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HYPERSTYLE_MODEL", {"tooltip": "From Load HyperStyle."}),
            "image": ("IMAGE", {"tooltip": ALIGNED_FACE_TIP}),
        }}

    RETURN_TYPES = ("HYPERSTYLE_LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "reconstruction")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, image):
        return ops.encode(model, image)


class HyperStyleRefine:
    DESCRIPTION = ("HyperStyle refinement: the hypernetwork predicts per-image generator weight offsets, refined over "
                   "a few iterations, so the reconstruction keeps identity and detail.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HYPERSTYLE_MODEL", {"tooltip": "From Load HyperStyle."}),
            "image": ("IMAGE", {"tooltip": ALIGNED_FACE_TIP + " Same batch as the latent (or the latent has 1)."}),
            "latent": ("HYPERSTYLE_LATENT", {"tooltip": "From e4e Encode (or an edited latent)."}),
            "iterations": ("INT", {"default": 5, "min": 0, "max": 50, "tooltip": "Refinement passes (5 is the "
                                                                                  "official setting)."}),
        }, "optional": {
            "deltas": ("HYPERSTYLE_DELTAS", {"tooltip": "Offsets to continue refining from (optional)."}),
        }}

    RETURN_TYPES = ("HYPERSTYLE_DELTAS", "IMAGE")
    RETURN_NAMES = ("deltas", "reconstruction")
    FUNCTION = "refine"
    CATEGORY = CATEGORY

    def refine(self, model, image, latent, iterations, deltas=None):
        return ops.refine(model, image, latent, iterations, deltas, on_step=_comfy_progress(iterations))


class HyperStyleDecode:
    DESCRIPTION = "Latent codes (+ HyperStyle offsets) -> image, on the model's generator or another domain's."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HYPERSTYLE_MODEL", {"tooltip": "From Load HyperStyle."}),
            "latent": ("HYPERSTYLE_LATENT", {"tooltip": "Codes to decode (edited or not)."}),
            "output_size": (["native", "512", "256"], {"default": "native",
                                                       "tooltip": "native: the generator's resolution (1024 for FFHQ)."}),
        }, "optional": {
            "deltas": ("HYPERSTYLE_DELTAS", {"tooltip": "HyperStyle offsets; leave empty for the plain generator."}),
            "generator": ("HYPERSTYLE_GENERATOR", {"tooltip": "Another domain's generator of the same architecture "
                                                              "(domain adaptation); offsets then apply to the fine "
                                                              "layers only, as in the official code."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, model, latent, output_size, deltas=None, generator=None):
        return (ops.decode(model, latent, deltas, output_size, generator),)


class HyperStyleLoadGenerator:
    DESCRIPTION = ("Loads another StyleGAN2 generator of the same architecture (e.g. StyleGAN-NADA pixar/sketch, a "
                   "toonify model) to decode an inversion in that domain.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "generator": (_models("generator"), {"tooltip": "A rosinality-format StyleGAN2 file (g_ema), a registry "
                                                            "name or a file in models/hyperstyle/."}),
            "precision": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "auto: fp32 on CPU, half precision "
                                                                             "on GPUs that support it."}),
            "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": "auto: ComfyUI's device."}),
        }}

    RETURN_TYPES = ("HYPERSTYLE_GENERATOR",)
    RETURN_NAMES = ("generator",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, generator, precision, device):
        return (ops.load_domain_generator(generator, device, precision),)


NODE_CLASS_MAPPINGS = {
    "HyperStyleLoader": HyperStyleLoader,
    "HyperStyleEncode": HyperStyleEncode,
    "HyperStyleRefine": HyperStyleRefine,
    "HyperStyleDecode": HyperStyleDecode,
    "HyperStyleLoadGenerator": HyperStyleLoadGenerator,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "HyperStyleLoader": "Load HyperStyle",
    "HyperStyleEncode": "e4e Encode",
    "HyperStyleRefine": "HyperStyle Refine",
    "HyperStyleDecode": "Decode",
    "HyperStyleLoadGenerator": "Load Generator (domain)",
}
