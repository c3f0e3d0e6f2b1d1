"""The HTTP (OpenAI-compatible) surface of the service."""
