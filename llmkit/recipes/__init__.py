"""Training recipes: explicit loops built from the shared pieces in llmkit.train."""
