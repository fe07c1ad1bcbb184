"""PEG core: ancestries, learngene sampling (mixing) and training (expanding phase), expansion, baselines, shapes, FLOPs."""
