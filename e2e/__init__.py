"""End-to-end tests: the real server and Chromium."""
