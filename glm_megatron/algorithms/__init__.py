"""One folder per post-training algorithm. An algorithm builds on engine/, generation/, models/
and data/ and never imports another algorithm (docs/ARCHITECTURE.md)."""
