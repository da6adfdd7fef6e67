"""srw: run your own Python next to your data."""
