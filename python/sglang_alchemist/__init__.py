"""sglang_alchemist: an SGLang server that keeps improving its model from user feedback.

Serving records the prefill activations a training step needs; feedback arrives over HTTP;
a LoRA trainer inside SGLang's scheduler replays the recorded activations instead of
recomputing the prompt, between serving batches, under a latency target; new adapter
versions are published to serving without downtime.
"""

__version__ = "0.1.0"
