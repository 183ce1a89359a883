"""GreenRFM training (RECIPES.md section 1): data over the cache, losses, the two-stage trainer."""

from appliance.train.trainer import TrainResult, latest_run, train_workspace

__all__ = ["TrainResult", "latest_run", "train_workspace"]
