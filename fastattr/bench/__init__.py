"""The attribution throughput benchmark behind ``fastattr bench``."""
