"""Devices: profiles, runtimes, latency models (roofline, kernel tables) behind one protocol, measuring,
fitting, the calibration kit, the search and the accuracy probes."""
