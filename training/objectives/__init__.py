"""The trainer's objectives, one module each, its class registered by name with ``@register_objective``:

==========  ==========================================================================================
``grpo``    Flow-GRPO's clipped-ratio policy gradient on the SDE window (:mod:`.grpo`)
``nft``     DiffusionNFT's negative-aware loss on the forward process, EMA old policy (:mod:`.nft`)
``rft``     reward-filtered self-training: passing turns replayed with the flow-matching loss (:mod:`.rft`)
``sft``     the supervised control: gold pairs (inputs optionally degraded), same loss and buffer (:mod:`.sft`)
``draft``   DRaFT-K: the mini judge's score back-propagated through the last K steps (:mod:`.draft`)
``dagger``  privileged ceiling: own states labelled with the world's true next scene (:mod:`.dagger`)
==========  ==========================================================================================

``OBJECTIVES`` maps the registered names to their classes (``--algo``'s choices); what they share
(the base class, the policy-gradient loop, the replay buffer and its loss) is in :mod:`.base`.
"""

from __future__ import annotations

from training.objectives.base import OBJECTIVES, Objective, register_objective, setting_owners

__all__ = ["OBJECTIVES", "Objective", "register_objective", "setting_owners"]
