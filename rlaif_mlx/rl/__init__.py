"""The RL math, written once over numpy or any array namespace: advantages, KL estimators and
controller, the policy objective, the learning-rate schedule. No framework, no I/O."""
