"""Alignment: preference data, reward models, and the pieces of the DPO/PPO/GRPO recipes
(llmkit/recipes/): verifiable rewards (rewards.py), toy tasks and prompt files (tasks.py), rollouts
sampled with the inference engine (rollout.py)."""

from .data import PreferenceData, PreferencePair, load_preference_data, preference_batch
from .reward import (RewardModel, check_same_tokenizer, load_reward_model, reward_model_from, save_reward_model,
                     score_batches)

__all__ = ["PreferenceData", "PreferencePair", "load_preference_data", "preference_batch", "RewardModel",
           "check_same_tokenizer", "load_reward_model", "reward_model_from", "save_reward_model", "score_batches"]
