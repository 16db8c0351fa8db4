"""Small public-domain texts shipped with llmkit (see SOURCE.md)."""
