"""AI teachers: rubric scoring by Claude, GPT or a local OpenAI-compatible judge.

``base`` (records and the client protocol), ``rubric`` (messages and the
tolerant parser), ``providers`` (the official async SDKs), ``cache`` (SQLite
score cache), ``cost`` (prices and the budget), ``judge`` (concurrency and all
of the above). Importing this package imports no SDK.
"""
