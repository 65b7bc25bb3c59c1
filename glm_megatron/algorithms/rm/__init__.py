"""Reward-model training: scalar head, pairwise ranking loss, accuracy and calibration, ``evaluate-rm``."""
