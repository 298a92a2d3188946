"""Load a model for profiling, evaluation or serving: the shipped tiny model, a known name, or a folder.

Everything is read from local files (``resolve.resolve_spec``); nothing is downloaded. Qwen2-VL-style models
are loaded with their tokenizer and image processor only (their ``AutoProcessor`` wants a video processor, which
needs torchvision); LLaVA-style models with their ``AutoProcessor``. Qwen3-VL, Idefics3, SmolVLM, Mistral 3
(Pixtral), InternVL and Gemma 3 get their own processor class built around the PIL image processor and, where the
class takes one, no video processor (``_processor``): no torchvision-backed image or video processor is ever loaded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

import torch

from sparsemm.errors import MissingDependencyError, ModelResolutionError
from sparsemm.resolve import ModelSpec, resolve_spec

QWEN_STYLE = ("qwen2_vl", "qwen2_5_vl")
LLAVA_STYLE = ("llava", "llava_next", "llava_onevision")
#: Families loaded through their processor class, built image-only: model type -> transformers processor class.
PROCESSOR_STYLE = {
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm": "SmolVLMProcessor",
    "mistral3": "PixtralProcessor",
    "internvl": "InternVLProcessor",
    "gemma3": "Gemma3Processor",
}
#: Processor classes that read a flat list of images as all the first prompt's: given one split per prompt instead.
SPLITS_FLAT_IMAGES = ("SmolVLMProcessor", "Gemma3Processor")
SUPPORTED = QWEN_STYLE + LLAVA_STYLE + tuple(PROCESSOR_STYLE)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model with what it needs to turn (image, prompt) into inputs."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    image_processor: Any
    processor: Any = None

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def path(self) -> Path:
        return self.spec.path


def load_model(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load ``name`` (tiny, a known name, a hub id in the local cache, or a folder) in eval mode."""
    import json

    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    spec = resolve_spec(name)
    path = spec.path
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED:
        raise ModelResolutionError(f"{path} is a {model_type!r} model; supported: {', '.join(SUPPORTED)}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    if model_type in QWEN_STYLE:
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        return LoadedModel(spec, model, tokenizer, image_processor)
    if model_type in PROCESSOR_STYLE:
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        processor = _processor(PROCESSOR_STYLE[model_type], path, image_processor)
    else:
        processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(spec, model, processor.tokenizer, processor.image_processor, processor)


def _processor(class_name: str, path: Path, image_processor: Any) -> Any:
    """The transformers processor ``class_name`` of the folder ``path`` around ``image_processor``, without a video
    processor if the class takes one.

    A video processor is auto-loaded through torchvision, which sparsemm never imports; images are all the profiler
    and the evaluation give. Such a class is built from the folder's processor settings (``processor_config.json``,
    chat template) and its tokenizer, through a subclass whose ``__init__`` passes no video processor."""
    import transformers

    base = getattr(transformers, class_name)
    params = inspect.signature(base.__init__).parameters
    if "video_processor" not in params:
        cls = _flat_images_split(base) if class_name in SPLITS_FLAT_IMAGES else base
        return cls.from_pretrained(path, image_processor=image_processor, local_files_only=True)
    settings, _ = base.get_processor_dict(path, local_files_only=True)
    components = ("self", "image_processor", "tokenizer", "video_processor")
    kwargs = {k: v for k, v in settings.items() if k in params and k not in components}
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return _image_only(base)(image_processor, tokenizer, **kwargs)


def _image_only(base: type) -> type:
    """``base`` (a processor class taking a video processor) built with none.

    SmolVLM's processor also refuses to start without ``num2words``, used only to spell a video's frame count: it is
    given a stand-in during its ``__init__`` only. And where SmolVLM reads a flat list of images as all one prompt's,
    this one splits it over the prompts by their ``<image>`` counts, as Idefics3's processor does; its chat
    template is applied without the video processor's frame settings SmolVLM's own reads."""
    smolvlm = base.__name__ == "SmolVLMProcessor"

    class ImageOnlyProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, **kwargs):
            if not smolvlm:
                super().__init__(image_processor, tokenizer, None, **kwargs)
                return
            from transformers.models.smolvlm import processing_smolvlm

            missing = processing_smolvlm.num2words is None
            if missing:
                processing_smolvlm.num2words = _no_num2words
            try:
                super().__init__(image_processor, tokenizer, None, **kwargs)
            finally:
                if missing:
                    processing_smolvlm.num2words = None

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # SmolVLM's own reads its video processor's frame settings; an image prompt needs none of them
            owner = base if smolvlm else ImageOnlyProcessor
            return super(owner, self).apply_chat_template(conversation, chat_template, **kwargs)

        def prepare_inputs_layout(self, images=None, text=None, **kwargs):
            if smolvlm:
                images = _split_flat_images(images, text, self.image_token)
            return super().prepare_inputs_layout(images=images, text=text, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor


def _flat_images_split(base: type) -> type:
    """``base`` (a processor class without a video processor) reading a flat list of images one prompt's worth at a
    time, by the prompts' ``image_token`` counts (Gemma 3's own wants one list per prompt)."""

    class FlatImagesProcessor(base):
        def prepare_inputs_layout(self, images=None, text=None, **kwargs):
            return super().prepare_inputs_layout(
                images=_split_flat_images(images, text, self.image_token), text=text, **kwargs
            )

    FlatImagesProcessor.__name__ = FlatImagesProcessor.__qualname__ = base.__name__
    return FlatImagesProcessor


def _no_num2words(number: int, **kwargs: Any) -> str:
    raise MissingDependencyError("SmolVLM video prompts need the num2words package; sparsemm gives images only")


def _split_flat_images(images: Any, text: Any, image_token: str) -> Any:
    """A flat list of images -> one list per prompt, by the prompts' ``image_token`` counts (left as is otherwise)."""
    from transformers.image_utils import is_valid_image

    if not isinstance(images, (list, tuple)) or not images or not is_valid_image(images[0]):
        return images
    if not isinstance(text, (list, tuple)) or len(text) < 2:
        return images
    counts = [t.count(image_token) for t in text]
    if sum(counts) != len(images):
        return images  # the processor's own check names the mismatch
    bounds = [0, *accumulate(counts)]
    return [list(images[a:b]) for a, b in pairwise(bounds)]
