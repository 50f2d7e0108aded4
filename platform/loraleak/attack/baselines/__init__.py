"""Baseline attacks, each behind `loraleak.attack.api.LeakageAttack` (filled in by the baselines work)."""
