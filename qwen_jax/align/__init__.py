"""Alignment: reward models, PPO and DPO (report §3.2)."""
