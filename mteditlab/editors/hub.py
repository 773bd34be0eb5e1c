"""Real editors on diffusers pipelines: offline loading, and the base class the backends share.

``load_pipeline`` never downloads: it looks the model up in the local Hugging Face cache (or a
local directory) first and raises ``EditorError`` at once, naming the model id, the cache and the
``hf download`` command, when the weights are absent. ``PipelineEditor`` turns a flow-matching
editing pipeline whose transformer reads ``[target tokens | context-image tokens]`` (FLUX.1
Kontext, Qwen-Image-Edit) into an ``Editor``: everything except the prompt/context encoding and
the VAE's latent normalisation is shared here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image

from mteditlab.editors.base import EditorError
from mteditlab.editors.flow_policy import FlowPolicy

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, else ``$MTEDITLAB_DEVICE``, else CUDA when available, else CPU."""
    device = device or os.environ.get("MTEDITLAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype``, else ``$MTEDITLAB_DTYPE`` (bf16/fp16/fp32), else bf16 on an accelerator and fp32 on CPU."""
    dtype = dtype or os.environ.get("MTEDITLAB_DTYPE") or ("fp32" if device.type == "cpu" else "bf16")
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in DTYPES:
        raise EditorError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype.lower()]


def resolve_offload(offload: bool | None) -> bool:
    """``offload``, else ``$MTEDITLAB_OFFLOAD`` (1/true/yes)."""
    if offload is not None:
        return offload
    return os.environ.get("MTEDITLAB_OFFLOAD", "").strip().lower() in {"1", "true", "yes"}


def model_index(model_id: str, env_var: str | None = None) -> Path:
    """Path of ``model_index.json`` for a local pipeline directory or a model in the local HF cache.

    Only the local cache is consulted (no network, whatever ``HF_HUB_OFFLINE`` says); a model that
    is not there raises ``EditorError`` with the command that fetches it.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    where = f" or set {env_var} to a local pipeline directory" if env_var else ""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise EditorError(f"{path} has no model_index.json: it is not a diffusers pipeline directory.")
        return path / "model_index.json"
    try:
        cached = try_to_load_from_cache(model_id, "model_index.json")
    except HFValidationError as error:
        raise EditorError(f"{model_id!r} is neither a local directory nor a Hugging Face model id{where}.") from error
    if not isinstance(cached, str):
        raise EditorError(
            f"The weights of {model_id} are not available locally: nothing in the Hugging Face cache at "
            f"{constants.HF_HUB_CACHE} (HF_HOME={constants.HF_HOME}). Fetch them on a machine with network "
            f"access with `hf download {model_id}` (gated models need `hf auth login` first){where}.")
    return Path(cached)


def load_pipeline(model_id: str, pipeline_classes: Sequence[str], *, dtype: str | torch.dtype | None = None,
                  device: str | torch.device | None = None, offload: bool | None = None,
                  env_var: str | None = None, components: Callable[[Path], dict] | None = None):
    """Load a diffusers pipeline from local files only.

    The class is taken from the checkpoint's ``model_index.json`` and must be one of
    ``pipeline_classes`` (diffusers class names). ``offload=True`` enables model CPU offload onto
    ``device`` (an accelerator); otherwise the whole pipeline moves to ``device``. ``components(root)``
    returns components built by hand from the pipeline directory ``root``, passed to
    ``from_pretrained`` in place of the ones ``model_index.json`` names.
    """
    index = model_index(model_id, env_var)
    device, offload = resolve_device(device), resolve_offload(offload)
    dtype = resolve_dtype(dtype, device)
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in pipeline_classes:
        raise EditorError(f"{model_id} is a {class_name}; this backend runs {', '.join(pipeline_classes)}.")
    if offload and device.type == "cpu":
        raise EditorError("Offloading moves weights from the CPU to an accelerator: it needs a non-CPU device.")
    try:
        import diffusers

        built = components(index.parent) if components else {}
        pipe = getattr(diffusers, class_name).from_pretrained(str(index.parent), dtype=dtype, local_files_only=True,
                                                              **built)
    except (OSError, ValueError) as error:
        raise EditorError(f"Could not load {model_id} from {index.parent} (incomplete download?): {error}. "
                          f"Complete it with `hf download {model_id}`.") from error
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def scheduler_sigmas(scheduler, steps: int, image_seq_len: int) -> torch.Tensor:
    """The σ grid an editing pipeline samples with: its scheduler's ``set_timesteps`` on
    ``linspace(1, 1/steps, steps)`` with ``mu`` from the target's token count (dynamic shifting),
    exactly as ``FluxKontextPipeline`` / ``QwenImageEdit*Pipeline`` do. ``steps + 1`` values."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler = type(scheduler).from_config(config)  # a copy: the pipeline's own state stays untouched
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@dataclass
class EditCondition:
    """A batch's condition for ``PipelineEditor.velocity``.

    ``context_latents``: packed clean latents of the context images ``[B, N_ctx, C]``, appended after
    the target tokens; ``transformer_kwargs``: the backend's other transformer inputs (text
    embeddings, positions, guidance); ``height``/``width``: the output size in pixels.
    """

    context_latents: torch.Tensor
    height: int
    width: int
    transformer_kwargs: dict[str, Any] = field(default_factory=dict)


class PipelineEditor(FlowPolicy):
    """A ``FlowPolicy`` on a diffusers editing pipeline (``self.pipe``; ``self.denoiser`` is its transformer).

    The output keeps the input's size, rounded down to the model's multiple (``multiple_of``), so
    multi-turn chains never drift in size; a batch shares one size. Sampling latents are the
    pipeline's *packed* latents ``[B, N, C]``; they stay fp32 between steps whatever the model dtype.
    Subclasses set ``default_steps``, ``default_model_id``, ``model_id_env``, ``pipeline_classes``
    (diffusers class names, imported only when loading), ``data_resolution`` and
    ``lora_target_modules``, and implement ``encode``, ``_vae_encode`` and ``_vae_decode``.
    """

    distributed = True
    default_model_id: ClassVar[str]
    model_id_env: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    forward_module: torch.nn.Module | None = None  # what ``velocity`` calls instead of ``denoiser``: its
    # distributed wrapper (DDP / FSDP) after ``accelerator.prepare``; LoRA handling stays on ``denoiser``

    def __init__(self, pipe, *, device: str | torch.device | None = None):
        if device is not None:
            pipe.to(device)
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.device = torch.device(device) if device is not None else pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self.multiple_of = pipe.vae_scale_factor * 2
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def create(cls, path: str | Path | None = None, device: str | None = None) -> "PipelineEditor":
        return cls.from_pretrained(path, device=device)

    @classmethod
    def model_id(cls, path: str | Path | None = None) -> str:
        """``path``, else ``$<model_id_env>``, else ``default_model_id``."""
        return str(path or os.environ.get(cls.model_id_env) or cls.default_model_id)

    @classmethod
    def available(cls, path: str | Path | None = None) -> bool:
        try:
            model_index(cls.model_id(path), cls.model_id_env)
        except EditorError:
            return False
        return True

    @classmethod
    def from_pretrained(cls, model_id: str | None = None, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, offload: bool | None = None, **kwargs):
        """Load from a model id or local directory (default ``$<model_id_env>``, else ``default_model_id``),
        local files only; ``dtype``/``device``/``offload`` default to ``$MTEDITLAB_DTYPE``/``_DEVICE``/``_OFFLOAD``."""
        pipe = load_pipeline(cls.model_id(model_id), cls.pipeline_classes, dtype=dtype, device=device, offload=offload,
                             env_var=cls.model_id_env, components=cls.pipeline_components)
        return cls(pipe, **kwargs)

    @classmethod
    def pipeline_components(cls, root: Path) -> dict:
        """Components this backend builds itself from the pipeline directory ``root`` (none here)."""
        return {}

    # ---- sizes and the σ grid ---------------------------------------------------------------------
    def output_size(self, images: Sequence[Image.Image]) -> tuple[int, int]:
        """``(height, width)`` of the batch's outputs: the shared input size rounded down to ``multiple_of``."""
        sizes = {image.size for image in images}
        if len(sizes) != 1:
            raise EditorError(f"{self.name}: a batch must share one image size, got {sorted(sizes)}.")
        width, height = sizes.pop()
        m = self.multiple_of
        if width < m or height < m:
            raise EditorError(f"{self.name}: images must be at least {m}×{m} pixels, got {width}×{height}.")
        return height // m * m, width // m * m

    def latent_shape(self, cond: EditCondition) -> tuple[int, int]:
        """``(N, C)``: one token per 2×2 latent patch, ``C = transformer.config.in_channels``."""
        m = self.multiple_of
        return (cond.height // m) * (cond.width // m), self.denoiser.config.in_channels

    def sigmas(self, steps: int, cond: EditCondition | None = None) -> torch.Tensor:
        """The pipeline's own σ grid for this output size (the scheduler shifts it by the token count)."""
        if cond is None:
            raise EditorError(f"{self.name}: the σ grid depends on the image size; call sigmas(steps, cond).")
        return scheduler_sigmas(self.pipe.scheduler, steps, self.latent_shape(cond)[0])

    # ---- the transformer ------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: EditCondition) -> torch.Tensor:
        """``v(x_σ, σ)`` on the packed target tokens; the context tokens are appended inside and sliced off."""
        hidden = torch.cat([x.to(self.device, self.dtype), cond.context_latents], dim=1)
        timestep = torch.as_tensor(sigma, device=self.device).to(self.dtype).expand(len(x))
        model = self.denoiser if self.forward_module is None else self.forward_module
        out = model(hidden_states=hidden, timestep=timestep, return_dict=False, **cond.transformer_kwargs)[0]
        return out[:, : x.shape[1]].to(x.dtype)

    # ---- latents <-> images ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], cond: EditCondition) -> torch.Tensor:
        """Images → packed clean latents at the condition's output size (fp32)."""
        return self._latents(images, cond.height, cond.width).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: EditCondition) -> list[Image.Image]:
        """Packed latents → PIL images of the condition's output size."""
        pixels = self._vae_decode(latents.to(self.device, self.pipe.vae.dtype), cond.height, cond.width)
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    def _latents(self, images: Sequence[Image.Image], height: int, width: int) -> torch.Tensor:
        pixels = self.pipe.image_processor.preprocess(list(images), height, width)
        return self._vae_encode(pixels.to(self.device, self.pipe.vae.dtype)).to(self.dtype)

    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1] → normalised, packed latents ``[B, N, C]`` (the VAE's mode)."""
        raise NotImplementedError

    def _vae_decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents → pixels ``[B, 3, height, width]`` in [-1, 1]."""
        raise NotImplementedError
