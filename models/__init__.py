"""Model zoo: small models built in code for tests, benchmarks and the demo."""
