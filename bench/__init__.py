"""Closed-loop streaming benchmark client for OpenAI-compatible servers.

Run ``python -m bench --help``; programmatic entry: ``bench.cli.main(argv)``.
"""
