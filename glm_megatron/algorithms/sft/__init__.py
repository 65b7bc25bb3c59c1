"""Supervised fine-tuning: loss on assistant tokens, LM evaluation, ``evaluate-sft``."""
