"""PEG core: ancestries, learngene sampling (mixing), the expanding phase's math, expansion, baselines,
shapes, FLOPs, the shipped assets."""
