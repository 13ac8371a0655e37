"""cellforge: agentic design of virtual-cell models for single-cell perturbation data."""

import os

# LiteLLM (imported by the LLM layer and by OpenHands) would otherwise fetch its price map
# from the network at import, with retries: use the bundled copy. OpenHands' banner is noise.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")

__version__ = "0.1.0"
