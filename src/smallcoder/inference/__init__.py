"""Inference: sampling, incremental detokenisation, the continuous-batching engine, scoring.

`sampling` (SamplingParams, sample), `detokenize` (text, stop strings and hold-back of one
sequence), `requests` (what the engine runs: generation or scoring, and Completion), `engine`
(Engine: the one decode loop, continuous batching, prefix reuse) and `scoring` (lm-eval's
log-likelihood conventions). The names below are the package's public API.
"""

from .engine import Engine
from .requests import Completion, Request, ScoreRequest
from .sampling import SamplingParams, sample
from .scoring import rolling_windows

__all__ = ["Completion", "Engine", "Request", "SamplingParams", "ScoreRequest", "rolling_windows", "sample"]
