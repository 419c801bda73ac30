"""What a served model reads: sentences (through the checkpoint's sentence encoder) or images
(decoded with Pillow at the checkpoint's size). One class per input kind, two steps each:

* ``prepare(content, media_type)`` checks and decodes one example or query as it arrives, so
  that a bad one is refused alone with a message that says what is wrong;
* ``batch(items)`` turns prepared items into the model's input tensor in one call (one
  encoder pass for a batch of sentences; examples through the embedding cache, queries not).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ImageInputs", "InputError", "TextInputs", "inputs_for"]

MAX_SENTENCE_CHARS = 2000


class InputError(ValueError):
    """An example or query the model cannot read; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class TextInputs:
    """Sentences, embedded by ``encoder`` (a name :func:`metalab.text.load_encoder` knows),
    or, for a model that fine-tuned the encoder's last ``top_layers``, their token states
    below those layers (:func:`metalab.text.sentence_inputs`)."""

    kind, plural = "text", "sentences"

    def __init__(self, encoder: str, top_layers: int = 0) -> None:
        self.encoder, self.top_layers = encoder, top_layers

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "encoder": str(self.encoder)}

    def shown(self, content: bytes) -> dict[str, Any]:
        """What a listing of examples shows of one: its text."""
        return {"text": content.decode()}

    def load(self) -> None:
        """Load the encoder now, so that the first request does not wait for it."""
        from metalab.text import load_encoder

        load_encoder(self.encoder)

    def prepare(self, content: bytes, media_type: str = "text/plain") -> str:
        if not media_type.startswith("text/"):
            raise InputError(f"this model reads sentences, not {media_type}; send sentences as "
                             'JSON strings, e.g. {"examples": ["my card is lost"]}.', 415)
        try:
            sentence = content.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError("a sentence is not valid UTF-8 text.") from None
        if not sentence.strip():
            raise InputError("a sentence is empty; give each example some words.")
        if len(sentence) > MAX_SENTENCE_CHARS:
            raise InputError(f"a sentence has {len(sentence)} characters, over the limit of "
                             f"{MAX_SENTENCE_CHARS}; an example is one sentence or a short "
                             "paragraph.", 413)
        return sentence

    def batch(self, items: Sequence[str], remember: bool = False) -> Tensor:
        """Embeddings of ``items``; ``remember``: through the embedding cache (examples, which
        are encoded again when a task is re-adapted) rather than straight from the encoder
        (queries, which would only grow the cache)."""
        from metalab.text import sentence_inputs

        return sentence_inputs(list(items), self.encoder, self.top_layers, progress=False,
                               remember=remember)


class ImageInputs:
    """Images decoded by :func:`metalab.data.images.read_image` at the model's input size
    (``invert`` as the training data set's images were)."""

    kind, plural = "image", "images"
    FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")

    def __init__(self, channels: int, size: int, invert: bool = False) -> None:
        self.channels, self.size, self.invert = channels, size, invert

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "channels": self.channels, "size": self.size}

    def shown(self, content: bytes) -> dict[str, Any]:
        """What a listing of examples shows of one: nothing beyond its hash and type."""
        return {}

    def load(self) -> None:
        """Nothing to load: Pillow decodes each image."""

    def prepare(self, content: bytes, media_type: str = "application/octet-stream") -> Tensor:
        from PIL import Image, UnidentifiedImageError

        from metalab.data.images import MAX_PIXELS, read_image

        if not media_type.startswith("image/"):
            raise InputError(f"this model reads images, not {media_type}; upload image files "
                             "(PNG, JPEG, ...) as multipart/form-data.", 415)
        try:
            with Image.open(io.BytesIO(content)) as probe:
                file_format = probe.format
        except UnidentifiedImageError:
            raise InputError("an upload is not an image Pillow can read (is it damaged?); send "
                             f"one of {', '.join(self.FORMATS)}.") from None
        except Image.DecompressionBombError:
            raise InputError(f"an image is too large: send images under {MAX_PIXELS / 1e6:g} "
                             "megapixels (they are shrunk to the model's input size anyway).",
                             413) from None
        if file_format not in self.FORMATS:
            raise InputError(f"{file_format} images are not accepted; send one of "
                             f"{', '.join(self.FORMATS)}.", 415)
        try:
            return read_image(io.BytesIO(content), self.channels, self.size, self.invert,
                              name="the uploaded image")
        except ValueError as error:
            status = 413 if "megapixels" in str(error) else 422
            raise InputError(str(error), status) from None

    def batch(self, items: Sequence[Tensor], remember: bool = False) -> Tensor:
        return torch.stack(list(items)).float() / 255


def inputs_for(algorithm, config) -> TextInputs | ImageInputs:
    """The inputs a checkpoint's model reads, from the data set it was trained on."""
    from metalab.data import DATASETS, image_format
    from metalab.text import DEFAULT_ENCODER

    if getattr(DATASETS.get(config.dataset), "TEXT", False):
        return TextInputs(config.dataset_options.get("encoder", DEFAULT_ENCODER),
                          config.dataset_options.get("top_layers", 0))
    shape = tuple(algorithm.spec.input_shape)
    if not algorithm.kind.classes or len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"metalab serve serves classifiers of sentences or images; this "
                         f"checkpoint was trained on {algorithm.kind.name} tasks with inputs of "
                         f"shape {shape}.")
    return ImageInputs(shape[0], shape[-1], **image_format(config.dataset))
