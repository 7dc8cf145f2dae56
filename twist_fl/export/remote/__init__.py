"""The modeling code an exported Hugging Face folder carries (loaded with trust_remote_code)."""
