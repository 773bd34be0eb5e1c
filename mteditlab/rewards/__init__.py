"""Reward backends behind one protocol (:mod:`mteditlab.rewards.base`) and a registry by name.

==============  =====================================================================================
``verifier``    the world's exact verifier (needs ``meta["session"]`` / ``meta["turn"]``)
``judge``       the world's small learned judge (``MiniJudge.from_pretrained(path)``)
``qwen-vl``     a Qwen-VL chat model as judge: in process (``QwenVLJudge.from_pretrained(model_id)``),
                or served by vLLM / SGLang when the path is an ``http(s)://`` URL or, without a path,
                ``$MTEDITLAB_JUDGE_URL`` is set (``endpoint.served_judge(url)``; ``?pairwise=1`` for
                Pref-GRPO win rates)
``calibrated``  the human-calibrated reward model fit by ``python -m training.reward_model``
                (``CalibratedReward.from_pretrained(path)``)
==============  =====================================================================================

Backends are imported lazily: asking for ``verifier`` never loads torch models or transformers.
"""

from __future__ import annotations

import os

from mteditlab.rewards.base import EditSample, RewardModel, RewardOutput

REWARDS = ("verifier", "judge", "qwen-vl", "calibrated")


def get_reward(name: str, **kwargs) -> RewardModel:
    """Build reward backend ``name``; ``kwargs`` go to its constructor / ``from_pretrained``:

    * ``verifier``: none;
    * ``judge``: ``path`` (checkpoint directory, default the packaged one) and judge options;
    * ``qwen-vl``: ``model_id`` (or ``path``), ``device``, ``mode``, ``votes``, ...; a URL as path
      (or ``$MTEDITLAB_JUDGE_URL`` when neither is given) selects the served judge, whose options
      may also ride on the URL's query;
    * ``calibrated``: ``path`` (the artifact directory written by ``training.reward_model``),
      optionally ``judge`` (an already built judge to reuse instead of the one the artifact names).
    """
    if name == "verifier":
        from mteditlab.rewards.verifier import VerifierReward
        if kwargs:
            raise TypeError(f"the verifier takes no options, got {sorted(kwargs)}")
        return VerifierReward()
    if name == "judge":
        from mteditlab.rewards.mini_judge import MiniJudge
        return MiniJudge.from_pretrained(**kwargs)
    if name == "qwen-vl":
        from mteditlab.rewards.endpoint import JUDGE_URL_ENV, is_endpoint_url, served_judge
        if "path" in kwargs:
            kwargs["model_id"] = kwargs.pop("path")
        location = kwargs.get("model_id") or os.environ.get(JUDGE_URL_ENV)
        if is_endpoint_url(location):
            kwargs.pop("model_id", None)
            return served_judge(location, **kwargs)
        from mteditlab.rewards.qwen_vl import QwenVLJudge
        return QwenVLJudge.from_pretrained(**kwargs)
    if name == "calibrated":
        from mteditlab.rewards.calibrated import CalibratedReward
        return CalibratedReward.from_pretrained(**kwargs)
    raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")


__all__ = ["REWARDS", "EditSample", "RewardModel", "RewardOutput", "get_reward"]
