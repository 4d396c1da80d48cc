"""Quality evaluation: FID, CLIP score and attribute accuracy, with tables and plots."""
