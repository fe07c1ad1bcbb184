"""The build: its config, the table of cached stages, the cache, the plan, shape tasks and their executors,
manifest, report and model cards."""
