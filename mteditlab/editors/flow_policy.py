"""The trainer's face of a flow-matching editor: the policy RL samples and updates.

``encode(images, texts) -> cond``, ``velocity(x, σ, cond)``, ``initial_noise(cond, seeds)``,
``sigmas(steps)``, ``decode(latents, cond)`` and ``encode_images(images, cond)``, so the training
loop never special-cases a backend; and the LoRA adapter lifecycle on ``self.denoiser``:

* ``default``: the trained adapter (``add_lora``, ``trainable_parameters``, ``adapter_disabled`` for
  the reference policy);
* ``old``: an EMA copy (``add_old_copy``, ``polyak_update``: old ← d·old + (1 − d)·default,
  ``old_policy`` runs it), NFT's old policy and RFT's exported Polyak average;
* ``save_lora`` / ``load_lora`` (the diffusers format), ``fuse_lora`` for inference.

"Base" vs "RL-tuned" is the same editor with and without a LoRA adapter on ``self.denoiser``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from PIL import Image

from mteditlab.editors.base import Editor, EditorError
from mteditlab.flow import flow_sigmas, ode_step

TRAINED, OLD = "default", "old"   # the adapters' names


class FlowPolicy(Editor):
    """A conditional flow-matching editor whose denoiser carries LoRA adapters.

    Subclasses set ``default_steps``, ``shift``, ``lora_prefix`` and ``lora_target_modules`` (or
    named sets of them in ``lora_presets``) and implement ``encode``, ``velocity``, ``latent_shape``,
    ``decode`` and ``encode_images``. ``distributed``: trained through ``accelerator.prepare``
    (DDP / FSDP / DeepSpeed); else the trainer averages gradients by hand. ``data_resolution``:
    the size data sessions are fitted to for it (``mteditlab.sessions_data.target_size``), or None.
    """

    shift: float = 1.0
    lora_prefix: str = "transformer"
    lora_target_modules: Sequence[str] = ()
    lora_presets: ClassVar[dict[str, Sequence[str]]] = {}
    distributed: ClassVar[bool] = False
    data_resolution: ClassVar[str | None] = None
    denoiser: torch.nn.Module
    device: torch.device = torch.device("cpu")

    @torch.no_grad()
    def edit_batch(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                   intents: Sequence[str | None] | None = None, seeds: Sequence[int] | None = None,
                   steps: int | None = None,
                   callback: Callable[[int, int], Any] | None = None) -> list[Image.Image]:
        """The deterministic ODE sampler, x ← x + (σ' − σ)·v(x, σ), from each item's seeded noise;
        ``callback(done, total)`` after each denoising step."""
        intents = intents or [None] * len(images)
        texts = [intent or text for text, intent in zip(instructions, intents)]
        seeds = list(seeds) if seeds is not None else list(range(len(images)))
        cond = self.encode(list(images), texts)
        x = self.initial_noise(cond, seeds)
        sigmas = self.sigmas(steps or self.default_steps, cond)
        total = len(sigmas) - 1
        for k, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x = ode_step(x, self.velocity(x, sigma.expand(len(x)), cond), sigma, sigma_next)
            if callback is not None:
                callback(k + 1, total)
        return self.decode(x, cond)

    # ---- the flow model ---------------------------------------------------------------------------
    def sigmas(self, steps: int, cond: Any = None) -> torch.Tensor:
        """σ grid of the backend's ``FlowMatchEulerDiscreteScheduler`` (with its ``shift``).

        Backends whose scheduler shifts σ by the image size (dynamic shifting) need ``cond``."""
        return flow_sigmas(steps, self.shift)

    def encode(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Any:
        """Condition for a batch: context images + instruction texts, in the backend's own form."""
        raise NotImplementedError

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """Predicted velocity ``v(x_σ, σ, cond)`` (shape of ``x``; ``sigma`` has shape ``[B]``)."""
        raise NotImplementedError

    def latent_shape(self, cond: Any) -> tuple[int, ...]:
        """Shape of one item's latent (without the batch dimension)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, cond: Any) -> list[Image.Image]:
        """Latents → images."""
        raise NotImplementedError

    def decode_pixels(self, latents: torch.Tensor, cond: Any) -> torch.Tensor:
        """Latents → RGB pixels ``[B, 3, H, W]`` in [−1, 1], differentiably (direct reward fine-tuning
        back-propagates through it). Backends without one cannot be tuned by ``--algo draft``."""
        raise NotImplementedError(f"{type(self).__name__} has no differentiable decode")

    def encode_images(self, images: Sequence[Image.Image], cond: Any) -> torch.Tensor:
        """Images → clean latents ``x0`` in the space ``velocity`` works in (used by NFT and RFT)."""
        raise NotImplementedError

    def initial_noise(self, cond: Any, seeds: Sequence[int]) -> torch.Tensor:
        """Per-item Gaussian noise, item i drawn from ``torch.Generator().manual_seed(seeds[i])``."""
        shape = self.latent_shape(cond)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    # ---- adapters (peft, saved in the diffusers format) -------------------------------------------
    def add_lora(self, rank: int, alpha: float, preset: str | None = None) -> None:
        """Attach a fresh trainable LoRA adapter (``default``) on ``lora_presets[preset]``, or on
        ``lora_target_modules`` when the backend has no presets or ``preset`` is None."""
        from peft import LoraConfig

        targets = self.lora_target_modules
        if self.lora_presets and preset is not None:
            if preset not in self.lora_presets:
                raise ValueError(f"{self.name}: unknown LoRA target set {preset!r}; one of {sorted(self.lora_presets)}")
            targets = self.lora_presets[preset]
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
        self.denoiser.add_adapter(config, adapter_name=TRAINED)

    def add_old_copy(self) -> None:
        """Add the ``old`` adapter: same rank, α and targets as ``default``, equal to it; ``default`` stays active."""
        from peft import LoraConfig

        config = self.denoiser.peft_config[TRAINED].to_dict()
        self.denoiser.add_adapter(LoraConfig(**{k: v for k, v in config.items() if k in ("r", "lora_alpha", "target_modules")}),
                                  adapter_name=OLD)
        self.polyak_update(decay=0.0)
        self.denoiser.set_adapter(TRAINED)

    @torch.no_grad()
    def polyak_update(self, decay: float) -> None:
        """old ← decay·old + (1 − decay)·default, parameter by parameter."""
        params = dict(self.denoiser.named_parameters())
        for name, p in params.items():
            if f".{TRAINED}." in name:
                params[name.replace(f".{TRAINED}.", f".{OLD}.")].lerp_(p, 1 - decay)

    @contextlib.contextmanager
    def old_policy(self):
        """Run the ``old`` (EMA) adapter instead of ``default``."""
        self.denoiser.set_adapter(OLD)
        try:
            yield
        finally:
            self.denoiser.set_adapter(TRAINED)

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the reference policy: the same model with its adapters switched off."""
        if not self.has_lora():
            yield
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The ``default`` adapter's parameters (what the optimizer steps)."""
        return [p for n, p in self.denoiser.named_parameters() if f".{TRAINED}." in n]

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every adapter's parameters by name (``default`` and ``old``): a checkpoint's content."""
        return {n: p for n, p in self.denoiser.named_parameters() if "lora_" in n}

    def adapter_state(self, adapter: str = TRAINED) -> dict[str, torch.Tensor]:
        """Adapter ``adapter``'s state dict in peft's names (what ``save_lora`` writes)."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser, adapter_name=adapter)

    def save_lora(self, directory: str | Path, metadata: dict | None = None, adapter_name: str = TRAINED,
                  state: dict | None = None) -> Path:
        """Save adapter ``adapter_name`` as ``pytorch_lora_weights.safetensors`` with keys prefixed by
        ``lora_prefix`` (the layout diffusers' ``load_lora_weights`` reads). ``state``: the adapter's
        peft state dict when already gathered (sharded training), else ``adapter_state``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = self.adapter_state(adapter_name)
        state = {f"{self.lora_prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        config = self.denoiser.peft_config[adapter_name].to_dict()
        # diffusers reads the adapter config from metadata keys carrying the same prefix as the weights
        config = {f"{self.lora_prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        save_file(state, str(directory / "pytorch_lora_weights.safetensors"),
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config, default=str)})
        (directory / "adapter_info.json").write_text(json.dumps({"editor": self.name, **(metadata or {})}, indent=2))
        return directory

    def fuse_lora(self) -> None:
        """Merge the active adapter into the base weights (W ← W + α/r·B·A) and drop it: inference then
        costs what the base costs. Irreversible on this instance: for the app and benchmarks only."""
        self.denoiser.fuse_lora()
        self.denoiser.unload_lora()

    def load_lora(self, directory: str | Path) -> None:
        """Load an adapter saved by ``save_lora`` (or by diffusers) as the active ``default`` adapter."""
        path = Path(directory) / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise EditorError(f"No LoRA adapter at {directory}: expected {path.name} inside it "
                              "(train one with `python -m training.grpo --lora`).")
        self.denoiser.load_lora_adapter(str(directory), prefix=self.lora_prefix, adapter_name=TRAINED,
                                        weight_name=path.name)
