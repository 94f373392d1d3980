"""Tollgate: a metering and budgeting reverse proxy for OpenAI's image API."""

__version__ = "0.1.0"
