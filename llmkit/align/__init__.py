"""Alignment: preference data, reward models, and the preference / RL losses' recipes (llmkit.recipes)."""

from .data import PreferenceData, PreferencePair, load_preference_data, preference_batch
from .reward import RewardModel, load_reward_model, reward_model_from, save_reward_model

__all__ = ["PreferenceData", "PreferencePair", "load_preference_data", "preference_batch",
           "RewardModel", "load_reward_model", "reward_model_from", "save_reward_model"]
