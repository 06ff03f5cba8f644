"""looplm: an inference engine for looped language models (Ouro)."""

from .api import Engine, Generation, Stream, load, save
from .config import LoopConfig
from .decoding import DecodeRequest, Step
from .model import LoopLM, LoopOutput
from .sampling import SamplingParams

__all__ = ["Engine", "Generation", "Stream", "LoopConfig", "LoopLM", "LoopOutput", "DecodeRequest", "SamplingParams", "Step", "load", "save"]
