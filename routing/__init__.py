"""Routers: per query (difficulty) and per token (reward/confidence), and policy files."""
