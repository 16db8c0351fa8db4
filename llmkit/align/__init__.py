"""Alignment: preference data, reward models, and the data and rewards of the DPO/PPO/GRPO recipes
(llmkit/recipes/)."""
