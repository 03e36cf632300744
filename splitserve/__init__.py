"""splitserve: disaggregated prefill/decode LLM serving.

Offline use, shaped like vLLM's API:

    from splitserve import LLM, SamplingParams
    outputs = LLM(model="/path/to/checkpoint").generate(["Hello"], SamplingParams(max_tokens=32))
"""

from splitserve.shared.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine imports torch; keep `import splitserve` light for the gateway and the CLI.
    if name == "LLM":
        from splitserve.shared.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from splitserve.shared import outputs

        return getattr(outputs, name)
    raise AttributeError(name)
