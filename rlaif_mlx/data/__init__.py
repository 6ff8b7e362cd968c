"""Tasks: JSONL task files, HumanEval, the bundled datasets and the tiny local model."""
