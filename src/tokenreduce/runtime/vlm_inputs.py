"""What a VLM's own forward was called with, for the stages that reduce its visual tokens.

The connector and in-LLM stages hook the language model, which sees only embeddings; the visual
tokens are found from the input ids the VLM's inner model received. `VisualInputs` keeps them (and
the caller's 2-D mask, and whether images came with the call) from a pre-hook on the inner model,
and says after the model's forward whether a stage that should have fired did.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from torch import Tensor

from ..core.errors import NeverFiredError
from ..core.undo import Undo
from ..families.vlms import VLMParts


class VisualInputs:
    def __init__(self, parts: VLMParts, undo: Undo, on_ids: Callable[[Tensor], None] | None = None):
        """``on_ids(ids)``: called with the ids before the VLM runs (budget checks before the tower's work)."""
        self.parts, self.on_ids = parts, on_ids
        self.ids: Tensor | None = None
        self.mask: Tensor | None = None  # the caller's 2-D padding mask
        self.images = False  # images (or pre-computed features) came with the call
        self.image_sizes: Tensor | None = None  # [images, 2] (height, width), when the VLM takes them (LLaVA-NeXT)
        self.ran = False  # the inner model ran since the last check
        self.fired = False  # the stage rewrote a prompt since the last check
        undo.append(parts.inner.register_forward_pre_hook(self._capture, with_kwargs=True).remove)
        if parts.family.anyres:  # generate computes the image features before the inner model runs: sizes from there
            self._wrap_image_features(undo)

    def _wrap_image_features(self, undo: Undo) -> None:
        inner = self.parts.inner
        original = inner.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate reads its signature
        def get_image_features(*args, **kwargs):
            sizes = signature.bind_partial(*args, **kwargs).arguments.get("image_sizes")
            self.image_sizes = sizes if isinstance(sizes, Tensor) else None
            return original(*args, **kwargs)

        undo.set_instance_attr(inner, "get_image_features", get_image_features)

    def _capture(self, inner, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.ids = ids if isinstance(ids, Tensor) else None
        self.mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self.images = (kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
                       or bool(kwargs.get("mm_encoder_outputs")))  # generate may run the tower before the call
        sizes = kwargs.get("image_sizes")
        if isinstance(sizes, Tensor):
            self.image_sizes = sizes
        self.ran = True
        if self.ids is not None and self.on_ids is not None:
            self.on_ids(self.ids)

    def take_image_sizes(self) -> Tensor | None:
        """The image sizes of the running call (LLaVA-NeXT), once: a later call brings its own."""
        sizes, self.image_sizes = self.image_sizes, None
        return sizes

    def take_ids(self) -> Tensor | None:
        """The ids of the running call, once (the language model's later calls in the same forward get None)."""
        ids, self.ids = self.ids, None
        return ids

    def check(self, who: str) -> None:
        """After the model's forward: the VLM must have run, and a call with images must have fired."""
        images, ran, fired = self.images, self.ran, self.fired
        self.images = self.ran = self.fired = False
        if not ran:
            raise NeverFiredError(f"the model ran but its vision-language model ({type(self.parts.inner).__name__}) did "
                                  f"not, so {who} never fired; call the VLM the method is attached to")
        if images and not fired:
            raise NeverFiredError(f"the model ran with images but {who} never saw their visual tokens enter the "
                                  "language model; is the prompt missing its image tokens?")
