"""Build pipeline: the staged, cached build, its executors (threads, Ray), reports, artifact safety and fingerprints, the demo assets."""
