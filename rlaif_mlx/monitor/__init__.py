"""Watching a run: metrics sinks (JSONL, TensorBoard, samples), the step record and plain
reporter, and the live dashboard."""
