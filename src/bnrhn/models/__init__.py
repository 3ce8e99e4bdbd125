"""Models built on the recurrent runner: image captioners (here) and the character-level language model
(``bnrhn.models.char_lm``)."""

from bnrhn.models.captioner import (
    MODELS,
    Captioner,
    CaptionerConfig,
    DecodeState,
    ShowAttendTell,
    ShowTell,
    build_captioner,
)

__all__ = ["MODELS", "Captioner", "CaptionerConfig", "DecodeState", "ShowTell", "ShowAttendTell", "build_captioner"]
