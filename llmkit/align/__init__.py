"""Alignment: preference data, reward models, and the RL pieces (verifiable rewards, rollouts)."""
