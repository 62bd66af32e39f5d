"""Preference tuning (DPO, IPO) of causal language models: pairs of a prompt with a chosen and a rejected completion."""
