"""The optimizer step on one process or many, through accelerate.

The mini editor keeps hand-averaged gradients; a ``distributed`` policy (the hub backends) goes
through ``accelerator.prepare`` (DDP, FSDP or DeepSpeed as ``accelerate launch`` configures), its
gradients accumulated over a minibatch's loss terms by ``accelerator.accumulate``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from mteditlab.editors.flow_policy import FlowPolicy

if TYPE_CHECKING:
    from training.config import GRPOConfig


class Updater:
    """Optimizer steps on the trained adapter: ``zero_grad``, then per loss term ``with term():
    backward(loss)``, then ``step()`` (gradients averaged over processes, norm clipped); a minibatch's
    gradient is the mean of its ``n_terms`` loss terms."""

    def __init__(self, accelerator, editor: FlowPolicy, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                 n_terms: int):
        self.accelerator, self.optimizer, self.max_grad_norm = accelerator, optimizer, max_grad_norm
        self.n_terms = n_terms
        self.model = None   # the prepared (distributed) denoiser of a distributed policy
        if editor.distributed:
            self.model, self.optimizer = accelerator.prepare(editor.denoiser, optimizer)
            if accelerator.gradient_accumulation_steps != n_terms:
                raise ValueError(f"the accelerate config sets gradient_accumulation_steps={accelerator.gradient_accumulation_steps}: "
                                 f"leave it out, the trainer accumulates the {n_terms} loss terms of a minibatch")
            editor.forward_module = self.model
        self.trainable = editor.trainable_parameters()

    @property
    def sharded(self) -> bool:
        """Parameters (and optimizer state) are split over processes: FSDP or DeepSpeed."""
        return self.accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def term(self):
        """Context of one loss term: ``accelerator.accumulate`` for a prepared model (gradients are
        synchronised only at the minibatch's last term), nothing for the mini editor."""
        return self.accelerator.accumulate(self.model) if self.model is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one of the ``n_terms`` loss terms averaged into a minibatch's gradient
        (accelerate divides by its ``gradient_accumulation_steps`` == ``n_terms``)."""
        if self.model is not None:
            self.accelerator.backward(loss)
        else:
            (loss / self.n_terms).backward()

    def step(self) -> None:
        """Clip the gradients' norm and step. The mini editor averages its gradients over processes
        here; a prepared model had them synchronised by accelerate."""
        if self.model is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            return
        for p in self.trainable:
            if p.grad is not None and self.accelerator.num_processes > 1:
                p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()


def accelerator_options(cfg: GRPOConfig, n_terms: int) -> dict:
    """``Accelerator`` options for a distributed policy: one optimizer step per minibatch's ``n_terms``
    loss terms (gradient accumulation), and ``--mixed-precision`` when given (else accelerate's config)."""
    options = {"gradient_accumulation_steps": n_terms}
    if cfg.mixed_precision:
        options["mixed_precision"] = cfg.mixed_precision
    return options


def ready_for_training(editor: FlowPolicy, cfg: GRPOConfig) -> None:
    """A distributed policy's denoiser before ``accelerator.prepare``: LoRA weights in fp32 whatever the
    base dtype (AdamW steps on bf16 weights lose small updates), gradient checkpointing when asked."""
    for p in editor.adapter_parameters().values():
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        editor.denoiser.enable_gradient_checkpointing()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; a collective: every process must call), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_lora(editor: FlowPolicy, adapter: str) -> dict[str, torch.Tensor]:
    """Adapter ``adapter``'s full state (peft names), gathered from the shards on every process."""
    return {k: full_tensor(v) for k, v in editor.adapter_state(adapter).items()}
