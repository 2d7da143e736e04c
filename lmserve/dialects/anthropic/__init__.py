"""The Anthropic Messages API dialect."""
