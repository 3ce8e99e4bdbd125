"""Models built on the recurrent runner: the captioner and the character-level language model."""
