"""Distillation at the site (RECIPES.md section 2): report-privileged task heads over a frozen
encoder (`stage.distill_workspace`), and a full GreenRFM distilled into GreenRFM-L (`encoder.distill_encoder`)."""
