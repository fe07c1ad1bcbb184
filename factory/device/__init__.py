"""Device cost and search: profiles, latency (roofline, kernel tables, calibration kit) and memory models, shape search, accuracy estimation."""
