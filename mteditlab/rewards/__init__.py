"""Reward backends behind one protocol (:mod:`mteditlab.rewards.base`), one module each, its class
registered by name with ``@register_reward``:

==============  =====================================================================================
``verifier``    the world's exact verifier (needs the session's ``split`` / ``index`` / ``turn`` in ``meta``)
``judge``       the world's small learned judge (``MiniJudge.from_pretrained(path)``)
``qwen-vl``     a Qwen-VL chat model as judge: in process (``QwenVLJudge.from_pretrained(model_id)``),
                or served by vLLM / SGLang when the path is an ``http(s)://`` URL or, without a path,
                ``$MTEDITLAB_JUDGE_URL`` is set (``endpoint.served_judge(url)``; ``?pairwise=1`` for
                Pref-GRPO win rates)
``calibrated``  the human-calibrated reward model fit by ``python -m training.reward_model``
                (``CalibratedReward.from_pretrained(path)``)
==============  =====================================================================================

Backends import their model libraries inside functions: asking for ``verifier`` never loads torch
models or transformers.
"""

from __future__ import annotations

from mteditlab.rewards.base import REWARDS, EditSample, RewardModel, RewardOutput, register_reward


def get_reward(name: str, **options) -> RewardModel:
    """Build reward backend ``name``; ``options`` go to its class's ``create``:

    * ``verifier``: none;
    * ``judge``: ``path`` (checkpoint directory, default the packaged one) and judge options;
    * ``qwen-vl``: ``model_id`` (or ``path``), ``device``, ``mode``, ``votes``, ...; a URL as path
      (or ``$MTEDITLAB_JUDGE_URL`` when neither is given) selects the served judge, whose options
      may also ride on the URL's query;
    * ``calibrated``: ``path`` (the artifact directory written by ``training.reward_model``),
      optionally ``judge`` (an already built judge to reuse instead of the one the artifact names).
    """
    return REWARDS[name].create(**options)


__all__ = ["REWARDS", "EditSample", "RewardModel", "RewardOutput", "get_reward", "register_reward"]
