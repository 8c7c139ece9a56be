"""The implementations behind the course "LLMs from Attention to RLHF"."""
