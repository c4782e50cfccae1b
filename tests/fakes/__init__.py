"""Real fakes for tests and benchmarks: an OpenAI-compatible upstream that injects faults."""
