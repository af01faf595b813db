"""What a run leaves to read: report.json from the workdir's files (build), report.md from it
(markdown), the pictures (pictures: what they show; plots: the drawing)."""
