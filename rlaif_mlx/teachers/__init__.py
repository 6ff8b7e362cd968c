"""AI teachers: rubric scoring by Claude, GPT or a local OpenAI-compatible judge.

``base`` (records and the client protocol), ``rubric`` (messages and the
tolerant parser), ``group`` (several completions judged side by side),
``references`` (reference solutions a teacher writes), ``plan`` (the calls of a
batch and their prompt-cache marks), ``providers`` (the official async SDKs) and
``failures`` (their errors in a line), ``cache`` (SQLite score cache), ``cost``
(prices and the budget), ``judge`` (concurrency and all of the above).
Importing this package imports no SDK.
"""
