"""The lottery: run directories, IMP, re-training tickets from θ0, the baselines and the main job (Gan et al. 2022)."""
