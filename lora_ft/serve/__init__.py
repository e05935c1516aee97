"""`serve`: adapters on shared bases answering in batches (`pool`, `batches`) behind the OpenAI-compatible HTTP API
(`server`)."""
