"""The editor protocol every backend implements.

Two faces:

* the app's: ``edit(image, instruction, *, intent, seed, steps) -> PIL.Image`` (and ``edit_batch``);
* RL's: ``encode(images, texts) -> cond``, ``velocity(x, σ, cond)``, ``initial_noise(cond, seeds)``,
  ``decode(latents, cond)``, ``encode_images(images, cond)``, ``sigmas(steps)`` and LoRA handling
  (``add_lora`` / ``adapter_disabled`` / ``save_lora`` / ``load_lora``), so the training loop
  never special-cases a backend.

"Base" vs "RL-tuned" is the same editor with and without a LoRA adapter on ``self.denoiser``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from mteditlab.flow import flow_sigmas, ode_step


class EditorError(RuntimeError):
    """A backend could not run (missing weights, bad input, ...); the message says what to do."""


class Editor:
    """Base class: a conditional flow-matching editor.

    Subclasses set ``name``, ``default_steps``, ``shift`` and ``lora_target_modules`` and implement
    ``encode``, ``velocity``, ``latent_shape``, ``decode`` and ``encode_images``.
    Reference editors that are not flow models (``oracle``, ``identity``) override ``edit_batch``.
    """

    name: str = "editor"
    default_steps: int = 10
    shift: float = 1.0
    lora_prefix: str = "transformer"
    lora_target_modules: Sequence[str] = ()
    denoiser: torch.nn.Module | None = None
    device: torch.device = torch.device("cpu")

    # ---- the app's face -------------------------------------------------------------------------
    def edit(self, image: Image.Image, instruction: str, *, intent: str | None = None, seed: int = 0,
             steps: int | None = None) -> Image.Image:
        """Edit one image. ``intent`` (an explicit, reconstructed instruction) replaces the raw
        instruction as the condition when given."""
        return self.edit_batch([image], [instruction], intents=[intent], seeds=[seed], steps=steps)[0]

    @torch.no_grad()
    def edit_batch(self, images: Sequence[Image.Image], instructions: Sequence[str], *,
                   intents: Sequence[str | None] | None = None, seeds: Sequence[int] | None = None,
                   steps: int | None = None,
                   callback: Callable[[int, int], Any] | None = None) -> list[Image.Image]:
        """Edit a batch with the deterministic ODE sampler; item i is a function of its own seed only.

        ``callback(done, total)``, when given, is called after each denoising step (progress
        reporting; it never changes the result)."""
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

    # ---- RL's face ------------------------------------------------------------------------------
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

    def encode_images(self, images: Sequence[Image.Image], cond: Any) -> torch.Tensor:
        """Images → clean latents ``x0`` in the space ``velocity`` works in (used by NFT)."""
        raise NotImplementedError

    def initial_noise(self, cond: Any, seeds: Sequence[int]) -> torch.Tensor:
        """Per-item Gaussian noise, item i drawn from ``torch.Generator().manual_seed(seeds[i])``."""
        shape = self.latent_shape(cond)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    # ---- LoRA (peft, saved in the diffusers format) ---------------------------------------------
    def add_lora(self, rank: int, alpha: float, target_modules: Sequence[str] | None = None) -> None:
        """Attach a fresh trainable LoRA adapter named ``default`` to ``self.denoiser``."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=list(target_modules or self.lora_target_modules))
        self.denoiser.add_adapter(config, adapter_name="default")

    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.denoiser.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the reference policy: the same model with its adapter switched off."""
        if not self.has_lora():
            yield
            return
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def save_lora(self, directory: str | Path, metadata: dict | None = None, adapter_name: str = "default",
                  state: dict | None = None) -> Path:
        """Save adapter ``adapter_name`` as ``pytorch_lora_weights.safetensors`` with keys prefixed by
        ``lora_prefix`` (the layout diffusers' ``load_lora_weights`` reads). ``state``: the adapter's
        peft state dict when already gathered (sharded training), else read from the denoiser."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = get_peft_model_state_dict(self.denoiser, adapter_name=adapter_name)
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
        self.denoiser.load_lora_adapter(str(directory), prefix=self.lora_prefix, adapter_name="default",
                                        weight_name=path.name)
