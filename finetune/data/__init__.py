"""Reading datasets, loading media with Qwen semantics, and encoding conversations into tokens."""
