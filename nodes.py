"""ComfyUI nodes for HyperStyle: thin classes over `hyperstyle_nodes` (the library does the work).

Node ids (the class names in NODE_CLASS_MAPPINGS) are public API: saved workflows refer to them.
"""
from __future__ import annotations

try:  # inside ComfyUI this file is a submodule of the pack's package
    from .hyperstyle_nodes import ops, safe_paths
    from .hyperstyle_nodes.faces import alignment as face_alignment
    from .hyperstyle_nodes.loaders import downloads
    from .hyperstyle_nodes.loaders.manager import DEVICE_CHOICES, DTYPE_CHOICES
    from .hyperstyle_nodes.stylegan2 import warmup
except ImportError:  # imported as a top-level module (tests, scripts)
    from hyperstyle_nodes import ops, safe_paths
    from hyperstyle_nodes.faces import alignment as face_alignment
    from hyperstyle_nodes.loaders import downloads
    from hyperstyle_nodes.loaders.manager import DEVICE_CHOICES, DTYPE_CHOICES
    from hyperstyle_nodes.stylegan2 import warmup

CATEGORY = "HyperStyle"
ALIGNED_FACE_TIP = ("Face-aligned photo(s) (use Align Face first). Any size or aspect is resized to 256x256 for the "
                    "encoders; grayscale is used as RGB and an alpha channel is ignored.")


def _comfy_progress(total: int, preview_every: int = 0):
    """A per-iteration callback: advances ComfyUI's progress bar and stops if the user cancelled; with
    preview_every, shows the current reconstruction the callback receives at the first step, then every that many."""
    try:
        import comfy.model_management as mm
        import comfy.utils
    except ImportError:  # outside ComfyUI
        return None
    bar = comfy.utils.ProgressBar(total)

    def on_step(done: int, of: int, current=None) -> None:  # `of` counts the iterations of every chunk of a batch
        mm.throw_exception_if_processing_interrupted()
        if current is not None and preview_every and (done == 1 or done % preview_every == 0 or done == of):
            bar.update_absolute(done, of, _preview(current))
        else:
            bar.update_absolute(done, of)

    return on_step


def _preview(images):
    """The first image of a [B, 3, H, W] batch in [0, 1] as ComfyUI's progress preview ("JPEG", PIL image, size)."""
    from PIL import Image
    try:
        from comfy.cli_args import args
        size = args.preview_size
    except (ImportError, AttributeError):
        size = 512
    pixels = (images[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(pixels), size)
def _comfy_notice(message: str) -> None:
    """A first-call notice (kernels compiling for a new batch size or precision): on the console, and under the running
    node in ComfyUI's UI, where the progress bar would otherwise sit still."""
    print(message, flush=True)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # outside ComfyUI, or one without node texts: the console line is all
        return
    context = get_executing_context()
    if context is not None and getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_progress_text(message, context.node_id)


warmup.set_default_listener(_comfy_notice)


def _models(*kinds: str) -> list:
    names = []
    for kind in kinds:
        names += [n for n in downloads.list_local_models(kind) if n not in names]
    return names or ["(no models found)"]


# the precision and device inputs of every loader node
PRECISION_AND_DEVICE = {
    "precision": (list(DTYPE_CHOICES), {"default": "auto", "tooltip": "auto: fp32 on CPU, half precision on GPUs "
                                                                      "that support it."}),
    "device": (list(DEVICE_CHOICES), {"default": "auto", "tooltip": "auto: ComfyUI's device."}),
}


class HyperStyleLoader:
    DESCRIPTION = ("Loads HyperStyle or StyleFeatureEditor (SFE; the checkpoint file decides) and its initial encoder "
                   "once and keeps them on the GPU between prompts. Registry models download on first use into "
                   "models/hyperstyle/.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (_models("hyperstyle", "sfe_editor", "sfe_inverter"), {
                "tooltip": "HyperStyle checkpoint (hypernetwork + generator) or StyleFeatureEditor checkpoint "
                           "(sfe_editor_light; sfe_inverter_light reconstructs but cannot edit), a registry name or "
                           "a file in models/hyperstyle/."}),
            "initial_encoder": (_models("w_encoder", "e4e") + ["none"], {
                "tooltip": "Encoder for the initial inversion: faces_w_encoder (W, the official choice) or "
                           "e4e_ffhq_encode (W+, better for edits). The file's contents decide which it is. SFE "
                           "needs e4e_ffhq_encode (its feature editor edits against it)."}),
            **PRECISION_AND_DEVICE,
        }, "optional": {
            "sfe_generator": (_models("generator"), {
                "default": ops.SFE_GENERATOR, "tooltip": "StyleFeatureEditor only: the StyleGAN2 generator it "
                                                         "decodes with (stylegan2-ffhq-config-f for the released "
                                                         "files). HyperStyle checkpoints hold their own."}),
        }}

    RETURN_TYPES = ("HYPERSTYLE_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, checkpoint, initial_encoder, precision, device, sfe_generator=ops.SFE_GENERATOR):
        return (ops.load_model(checkpoint, initial_encoder, precision, device, sfe_generator),)


class HyperStyleEncode:
    DESCRIPTION = ("Initial inversion with the model's encoder: aligned face -> latent codes and their "
                   "reconstruction. With a StyleFeatureEditor model, its whole inversion (codes, e4e codes and "
                   "F-space features on the latent): connect it straight to Apply Edit / Decode.")

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
                   "a few iterations, so the reconstruction keeps identity and detail. HyperStyle models only (SFE "
                   "inversions are finished after e4e Encode).")

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


class HyperStyleOptimize:
    DESCRIPTION = ("The iterator: refines a latent (and optionally HyperStyle's offsets) by gradient descent against "
                   "the image, starting from the encoder's codes. Sharper, more faithful reconstructions for a few "
                   "seconds (GPU) to minutes (CPU) per image; 50-200 steps are typical.")
    PREVIEW_EVERY = 10

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HYPERSTYLE_MODEL", {"tooltip": "From Load HyperStyle."}),
            "image": ("IMAGE", {"tooltip": ALIGNED_FACE_TIP + " Same batch as the latent (or the latent has 1)."}),
            "latent": ("HYPERSTYLE_LATENT", {"tooltip": "Starting codes, from e4e Encode."}),
            "steps": ("INT", {"default": 100, "min": 0, "max": 5000, "tooltip": "Adam steps (each one generator "
                                                                                  "pass forward and back)."}),
            "learning_rate": ("FLOAT", {"default": 0.01, "min": 0.0001, "max": 1.0, "step": 0.001, "tooltip": (
                "Adam's step size on the codes: higher moves faster but may overshoot.")}),
            "mse": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Pixel L2 weight."}),
            "lpips": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": (
                "LPIPS weight (0.8 is the paper's): sharper detail. Needs the `lpips` package and "
                "alexnet-owt-7be5be79.pth in models/hyperstyle/.")}),
            "identity": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.05, "tooltip": (
                "ArcFace identity weight (faces; 0.1 in the official recipe). Needs model_ir_se50.pth in "
                "models/hyperstyle/.")}),
            "optimize": (list(ops.OPTIMIZE_TARGETS), {"default": "codes", "tooltip": (
                "codes: only the latent (connected offsets stay fixed); codes + offsets: also HyperStyle's weight "
                "offsets (closer still, edits may keep less of their effect). With Refine's offsets connected, "
                "choose codes + offsets: with fixed offsets, 200 steps ended 6% above a start from the average "
                "latent in our benchmark, with both optimised 9% below.")}),
        }, "optional": {
            "deltas": ("HYPERSTYLE_DELTAS", {"tooltip": "Offsets from HyperStyle Refine to start from (optional)."}),
        }}

    RETURN_TYPES = ("HYPERSTYLE_LATENT", "HYPERSTYLE_DELTAS", "IMAGE")
    RETURN_NAMES = ("latent", "deltas", "reconstruction")
    FUNCTION = "optimize"
    CATEGORY = CATEGORY

    def optimize(self, model, image, latent, steps, learning_rate, mse, lpips, identity, optimize, deltas=None):
        return ops.optimize(model, image, latent, steps, learning_rate, mse, lpips, identity, optimize, deltas,
                            on_step=_comfy_progress(steps, self.PREVIEW_EVERY))


class HyperStyleDecode:
    DESCRIPTION = ("Latent codes (+ HyperStyle offsets) -> image, on the model's generator or another domain's. An "
                   "SFE inversion decodes through SFE's feature editor, which keeps its detail through the edit.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("HYPERSTYLE_MODEL", {"tooltip": "From Load HyperStyle."}),
            "latent": ("HYPERSTYLE_LATENT", {"tooltip": "Codes to decode (edited or not)."}),
            "output_size": (["native", "512", "256"], {
                "default": "native", "tooltip": "native: the generator's resolution (1024 for FFHQ)."}),
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
            **PRECISION_AND_DEVICE,
        }}

    RETURN_TYPES = ("HYPERSTYLE_GENERATOR",)
    RETURN_NAMES = ("generator",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, generator, precision, device):
        return (ops.load_domain_generator(generator, device, precision),)


class HyperStyleAlignFace:
    DESCRIPTION = ("Finds faces (RetinaFace, any orientation) and aligns them the way FFHQ was made (eyes and mouth "
                   "placed by the FFHQ recipe, with dlib's landmarks when installed), which HyperStyle needs. Outputs "
                   "the aligned faces and how to paste them back.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "Photo(s) of any size; grayscale and RGBA work (alpha is ignored)."}),
            "detector": (_models("face_detector"), {"tooltip": "RetinaFace weights: resnet50 (accurate) or "
                                                               "mobilenet0.25 (fast); downloaded on first use."}),
            "output_size": (["1024", "512", "256"], {"default": "1024", "tooltip": "Size of the aligned square."}),
            "selection": (list(face_alignment.SELECTIONS), {
                "default": "largest", "tooltip": "largest: one face per photo; index: the face_index-th largest; "
                                                 "all: every face (a group photo becomes a batch)."}),
            "face_index": ("INT", {"default": 0, "min": 0, "max": 99, "tooltip": "With selection=index: 0 is the "
                                                                                 "largest face."}),
            "threshold": ("FLOAT", {"default": 0.9, "min": 0.05, "max": face_alignment.MAX_THRESHOLD, "step": 0.01,
                                    "tooltip": "Detection confidence; lower it if a face is missed."}),
            "on_no_face": (list(face_alignment.NO_FACE_ACTIONS), {
                "default": "error", "tooltip": "error: stop with a message; center_crop: pass the photo through as a "
                                               "centred square crop."}),
        }, "optional": {
            "landmarks": (list(face_alignment.LANDMARK_CHOICES), {
                "default": "auto", "tooltip": "Where the eyes and mouth are taken from. dlib68: dlib's 68 points, the "
                                              "FFHQ recipe's own (needs the dlib extra); retinaface5: the detector's "
                                              "five points; auto: dlib68 when installed, else retinaface5."}),
        }}

    RETURN_TYPES = ("IMAGE", "HYPERSTYLE_ALIGNMENT")
    RETURN_NAMES = ("aligned_faces", "alignment")
    FUNCTION = "align"
    CATEGORY = CATEGORY

    def align(self, image, detector, output_size, selection, face_index, threshold, on_no_face, landmarks="auto"):
        faces, records = face_alignment.align_batch(image, ops.load_detector(detector), int(output_size), selection,
                                               face_index, threshold, on_no_face, landmarks)
        return faces, records


class HyperStylePasteBack:
    DESCRIPTION = ("Puts (edited) aligned faces back into the original photos through feathered face masks, all "
                   "faces of a photo in one pass; everything outside the masks is left untouched.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "original": ("IMAGE", {"tooltip": "The photo(s) that went into Align Face."}),
            "face": ("IMAGE", {"tooltip": "Aligned face(s) to paste, one per alignment record, any size."}),
            "alignment": ("HYPERSTYLE_ALIGNMENT", {"tooltip": "From Align Face."}),
            "feather": ("FLOAT", {"default": 32.0, "min": 0.0, "max": 256.0, "step": 1.0,
                                  "tooltip": "Softness of the mask edge, in pixels of the aligned face."}),
        }}

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "paste"
    CATEGORY = CATEGORY

    def paste(self, original, face, alignment, feather):
        return face_alignment.paste_back_batch(original, face, alignment, feather)


_NAMED_EDITS_TIP = ("Working strengths (SFE's editing menu, the same on HyperStyle): "
                    + "; ".join(ops.menu.describe(name) for name in ops.menu.NAMED_EDITS) + ". Named GANSpace edits "
                    "bring their own component and layers, StyleSpace edits their own channels (layer_start/end and "
                    "ganspace_component are not used for them).")


def _edit_inputs():
    return {
        "direction": (ops.direction_choices() or ["(no directions found)"], {
            "tooltip": "InterFaceGAN age/smile/pose/rotation, SFE's W+ boundaries (sfe_fs_*), named GANSpace edits "
                       "(ganspace_*), StyleSpace edits (stylespace_*, no file: applied by Decode / Text Edit), a "
                       "GANSpace PCA file, or your own direction in models/hyperstyle/directions/ "
                       "(.pt/.npy/.safetensors, shape (512,), (1,512), (n,512) or (1,n,512)). "
                       + _NAMED_EDITS_TIP}),
        "layer_start": ("INT", {"default": 0, "min": 0, "max": 17, "tooltip": "First style layer to edit."}),
        "layer_end": ("INT", {"default": -1, "min": -1, "max": 18, "tooltip": "Style layer to stop before; -1 = all."}),
    }


class HyperStyleApplyEdit:
    DESCRIPTION = ("Moves the latent codes along an edit direction. The HyperStyle offsets stay as they are, which "
                   "is why the edited face keeps its identity; an SFE inversion's e4e codes get the same edit. A "
                   "StyleSpace edit (stylespace_*) moves style channels instead, which Decode applies.")

    @classmethod
    def INPUT_TYPES(cls):
        inputs = {"latent": ("HYPERSTYLE_LATENT", {"tooltip": "From e4e Encode (or Load Inversion)."})}
        inputs.update(_edit_inputs())
        inputs["strength"] = ("FLOAT", {"default": 2.0, "min": -50.0, "max": 50.0, "step": 0.1,
                                        "tooltip": "How far to move; negative reverses (e.g. younger). For GANSpace "
                                                   "it is the target position in standard deviations."})
        inputs["ganspace_component"] = ("INT", {"default": 0, "min": 0, "max": 511,
                                                "tooltip": "GANSpace files only: which principal component."})
        return {"required": inputs}

    RETURN_TYPES = ("HYPERSTYLE_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "edit"
    CATEGORY = CATEGORY

    def edit(self, latent, direction, layer_start, layer_end, strength, ganspace_component):
        return (ops.apply_edit(latent, direction, strength, layer_start, layer_end, ganspace_component),)


class HyperStyleEditSweep:
    DESCRIPTION = ("One latent -> a batch over a range of strengths (before/after strips, animations). Connect the "
                   "offsets too so they are repeated to match.")

    @classmethod
    def INPUT_TYPES(cls):
        inputs = {"latent": ("HYPERSTYLE_LATENT", {"tooltip": "The latent to sweep (any batch)."})}
        inputs.update(_edit_inputs())
        inputs["strength_from"] = ("FLOAT", {"default": -3.0, "min": -50.0, "max": 50.0, "step": 0.1,
                                             "tooltip": "First strength."})
        inputs["strength_to"] = ("FLOAT", {"default": 3.0, "min": -50.0, "max": 50.0, "step": 0.1,
                                           "tooltip": "Last strength."})
        inputs["steps"] = ("INT", {"default": 7, "min": 2, "max": 256, "tooltip": "Number of strengths."})
        return {"required": inputs, "optional": {
            "deltas": ("HYPERSTYLE_DELTAS", {"tooltip": "Offsets of the latent, repeated to match the sweep."})}}

    RETURN_TYPES = ("HYPERSTYLE_LATENT", "HYPERSTYLE_DELTAS")
    RETURN_NAMES = ("latent", "deltas")
    FUNCTION = "sweep"
    CATEGORY = CATEGORY

    def sweep(self, latent, direction, layer_start, layer_end, strength_from, strength_to, steps, deltas=None):
        return ops.edit_sweep(latent, direction, strength_from, strength_to, steps, layer_start, layer_end, deltas)


def _text_edit_inputs(**strengths):
    """The text edit's inputs, with the strength input(s) before β."""
    return {
        "model": ("HYPERSTYLE_MODEL", {"tooltip": "From Load HyperStyle."}),
        "latent": ("HYPERSTYLE_LATENT", {"tooltip": "Codes of the inversion (from e4e Encode or Load Inversion)."}),
        "neutral_text": ("STRING", {"default": "face with hair", "tooltip": "What the face is now, in words."}),
        "target_text": ("STRING", {"default": "face with curly hair", "tooltip": "What it should become."}),
        **strengths,
        "beta": ("FLOAT", {"default": 0.13, "min": 0.08, "max": 0.3, "step": 0.01,
                           "tooltip": "Disentanglement: only StyleSpace channels whose relevance to the text reaches "
                                      "β change. Higher: fewer channels, a more targeted edit."}),
    }


_TEXT_EDIT_OPTIONAL = {
    "deltas": ("HYPERSTYLE_DELTAS", {"tooltip": "HyperStyle offsets of the inversion (kept, so identity stays)."}),
    "output_size": (["native", "512", "256"], {"default": "native", "tooltip": "native: the generator's "
                                                                               "resolution."}),
}
_TEXT_EDIT_TIP = (" Needs fs3.npy, S_mean_std and templates.txt (official HyperStyle release, "
                  "editing/styleclip/global_directions/) in models/hyperstyle/styleclip/ and the transformers "
                  "package; CLIP ViT-B/32 downloads on first use.")


class HyperStyleTextEdit:
    DESCRIPTION = ("Edits an inversion with a text: a StyleCLIP global direction from 'neutral' to 'target' "
                   "applied in StyleSpace, HyperStyle offsets kept; on a StyleFeatureEditor inversion the same "
                   "StyleSpace move runs through its feature editor. Outputs the edited image." + _TEXT_EDIT_TIP)

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _text_edit_inputs(alpha=("FLOAT", {"default": 4.0, "min": -10.0, "max": 10.0, "step": 0.1,
                                                    "tooltip": "Strength; negative moves towards the neutral text."}))
        return {"required": inputs, "optional": dict(_TEXT_EDIT_OPTIONAL)}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "edit"
    CATEGORY = CATEGORY

    def edit(self, model, latent, neutral_text, target_text, alpha, beta, deltas=None, output_size="native"):
        return (ops.text_edit(model, latent, neutral_text, target_text, alpha, beta, deltas, output_size),)


class HyperStyleTextEditSweep:
    DESCRIPTION = ("A text edit over a range of strengths: one image per α (strength-major, as Edit Sweep)."
                   + _TEXT_EDIT_TIP)

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _text_edit_inputs(
            alpha_from=("FLOAT", {"default": -5.0, "min": -10.0, "max": 10.0, "step": 0.1, "tooltip": "First strength."}),
            alpha_to=("FLOAT", {"default": 5.0, "min": -10.0, "max": 10.0, "step": 0.1, "tooltip": "Last strength."}),
            steps=("INT", {"default": 5, "min": 2, "max": 64, "tooltip": "Number of strengths."}))
        return {"required": inputs, "optional": dict(_TEXT_EDIT_OPTIONAL)}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "sweep"
    CATEGORY = CATEGORY

    def sweep(self, model, latent, neutral_text, target_text, alpha_from, alpha_to, steps, beta, deltas=None,
              output_size="native"):
        alphas = ops.editing.linspace_strengths(alpha_from, alpha_to, steps)
        return (ops.text_edit(model, latent, neutral_text, target_text, alphas, beta, deltas, output_size),)


def _output_dir():
    try:
        import folder_paths
        return folder_paths.get_output_directory()
    except ImportError:
        return "output"


class HyperStyleSaveInversion:
    DESCRIPTION = ("Saves codes + offsets + model id (or an SFE inversion: codes, e4e codes and F-space features) "
                   "to one .safetensors file in output/hyperstyle/, never overwriting.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("HYPERSTYLE_LATENT", {"tooltip": "Codes to save."}),
            "filename_prefix": ("STRING", {"default": "hyperstyle/inversion", "tooltip": "Path under the output "
                                                                                         "folder."}),
        }, "optional": {"deltas": ("HYPERSTYLE_DELTAS", {"tooltip": "Offsets to save with the codes."})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    CATEGORY = CATEGORY

    def save(self, latent, filename_prefix, deltas=None):
        path = ops.save_inversion(_output_dir(), filename_prefix, latent, deltas)
        return {"ui": {"text": [str(path)]}, "result": (str(path),)}


class HyperStyleLoadInversion:
    DESCRIPTION = ("Loads an inversion saved by Save Inversion (codes + offsets, or an SFE inversion), to edit it "
                   "again without inverting.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"inversion": (ops.saved_inversions(_output_dir()) or ["(none saved yet)"], {
            "tooltip": "A .safetensors file under output/ written by Save Inversion."})}}

    RETURN_TYPES = ("HYPERSTYLE_LATENT", "HYPERSTYLE_DELTAS")
    RETURN_NAMES = ("latent", "deltas")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, inversion):
        return ops.load_inversion(safe_paths.path_under(_output_dir(), inversion, "inversion", "the output folder",
                                                        "hyperstyle/inversion_00001.safetensors"))


NODE_CLASS_MAPPINGS = {
    "HyperStyleLoader": HyperStyleLoader,
    "HyperStyleEncode": HyperStyleEncode,
    "HyperStyleRefine": HyperStyleRefine,
    "HyperStyleOptimize": HyperStyleOptimize,
    "HyperStyleDecode": HyperStyleDecode,
    "HyperStyleLoadGenerator": HyperStyleLoadGenerator,
    "HyperStyleAlignFace": HyperStyleAlignFace,
    "HyperStylePasteBack": HyperStylePasteBack,
    "HyperStyleApplyEdit": HyperStyleApplyEdit,
    "HyperStyleEditSweep": HyperStyleEditSweep,
    "HyperStyleSaveInversion": HyperStyleSaveInversion,
    "HyperStyleLoadInversion": HyperStyleLoadInversion,
    "HyperStyleTextEdit": HyperStyleTextEdit,
    "HyperStyleTextEditSweep": HyperStyleTextEditSweep,
}

# A prompt may come from anyone who reaches the server: while a node runs, model files are read only from the models
# folders (safe_paths.confined); Python and CLI callers of `ops` keep taking any path.
for _node_class in NODE_CLASS_MAPPINGS.values():
    safe_paths.confine_node(_node_class)

NODE_DISPLAY_NAME_MAPPINGS = {
    "HyperStyleLoader": "Load HyperStyle",
    "HyperStyleEncode": "e4e Encode",
    "HyperStyleRefine": "HyperStyle Refine",
    "HyperStyleOptimize": "HyperStyle Optimize",
    "HyperStyleDecode": "Decode",
    "HyperStyleLoadGenerator": "Load Generator (domain)",
    "HyperStyleAlignFace": "Align Face",
    "HyperStylePasteBack": "Paste Face Back",
    "HyperStyleApplyEdit": "Apply Edit Direction",
    "HyperStyleEditSweep": "Edit Sweep",
    "HyperStyleSaveInversion": "Save Inversion",
    "HyperStyleLoadInversion": "Load Inversion",
    "HyperStyleTextEdit": "Text Edit (StyleCLIP)",
    "HyperStyleTextEditSweep": "Text Edit Sweep (StyleCLIP)",
}
