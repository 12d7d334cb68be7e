"""Dead letters: the letter and its writer, and ``dlq replay``."""
