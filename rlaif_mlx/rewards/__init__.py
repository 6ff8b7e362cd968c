"""Rewards: the tiered pipeline (static checks, unit tests, the gated teacher), the graders,
the in-sandbox test harness and the sandbox that runs untrusted code."""
